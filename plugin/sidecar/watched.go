package sidecar

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/plugin/chain"
	"github.com/haconnect/haconnect/spoa/authz"
)

// watched is what the watches fill and the apply loop reads, a snapshot at
// a time. A watch changes it through update, which wakes the apply loop.
type watched struct {
	changed chan struct{} // a change is waiting to be applied

	mu     sync.Mutex
	reg    *proxyConfig
	regErr error
	leaf   *api.LeafCert
	roots  *api.CARootList
	// l7Sets are the destination's native L7 sets
	// (authz.Authorizer.NativeSets), when the embedded SPOA answers them.
	l7Sets []*authz.NativeSet
	// endpoints are the instances of each upstream (by key), from its
	// watch's first answer on: a key that is absent is not loaded yet.
	// Each slice is replaced whole, never changed in place.
	endpoints map[string][]endpoint
	watching  map[string]*upstreamWatch
	// chains are the last answers of each upstream's discovery chain
	// watch (chain.go), by upstream key; absent: no answer yet.
	chains        map[string]chainAnswer
	chainWatching map[string]*chainWatch
	// targetEndpoints are the instances of each chain target, by
	// targetKey, as endpoints are; targetWatching their watches.
	targetEndpoints map[string][]endpoint
	targetWatching  map[string]*upstreamWatch
	// chainsInUse are the chains the apply loop serves (a refused chain
	// keeps the previous one), whose targets stay watched.
	chainsInUse map[string]*chain.Plan
	// watchCtx bounds the target watches (the upstream watches' context).
	watchCtx context.Context
	// exposedChecks are the checks the agent reroutes to the proxy while
	// the registration asks for Expose.Checks (expose.go); nil: none yet.
	exposedChecks *consulwatch.ExposedChecks
	checksWatch   *exposedChecksWatch
	pendingAt     time.Time // first change not yet applied
}

// upstreamGrace is how long an upstream's first answer is waited for
// before the upstream is configured with no instances (HAProxy answers
// 503 for it) so that it does not hold back the others, nor the leaf and
// roots. A watch that fails (an unknown datacenter, a token without
// rights) is not waited for at all.
const upstreamGrace = 5 * time.Second

// upstreamWatch is the health watch of one upstream.
type upstreamWatch struct {
	cancel  context.CancelFunc
	status  *consulwatch.Status
	started time.Time
	err     error // the failure that started the current failing run
	// unread: the upstream was given up on (configured empty) before its
	// first answer, and that was logged.
	unread bool
}

func newWatched() watched {
	return watched{changed: make(chan struct{}, 1), endpoints: map[string][]endpoint{}, watching: map[string]*upstreamWatch{},
		chains: map[string]chainAnswer{}, chainWatching: map[string]*chainWatch{},
		targetEndpoints: map[string][]endpoint{}, targetWatching: map[string]*upstreamWatch{}, chainsInUse: map[string]*chain.Plan{}}
}

// update changes the watched state and wakes the apply loop.
func (w *watched) update(f func()) {
	w.mu.Lock()
	f()
	if w.pendingAt.IsZero() {
		w.pendingAt = time.Now()
	}
	w.mu.Unlock()
	w.wake()
}

func (w *watched) wake() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// wakeAfter wakes the apply loop after d.
func (w *watched) wakeAfter(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
		w.wake()
	}
}

// requeue keeps the first pending time of changes that could not be applied
// yet, so the apply latency covers the wait.
func (w *watched) requeue(at time.Time) {
	if at.IsZero() {
		return
	}
	w.mu.Lock()
	if w.pendingAt.IsZero() || at.Before(w.pendingAt) {
		w.pendingAt = at
	}
	w.mu.Unlock()
}

// snapshot is a consistent copy of the watched state.
type snapshot struct {
	reg       *proxyConfig
	regErr    error
	leaf      *api.LeafCert
	roots     *api.CARootList
	l7Sets    []*authz.NativeSet
	endpoints map[string][]endpoint
	// chains are the upstreams' chain answers (absent: not read, served
	// as the default chain); targetEndpoints the instances of the targets
	// of those chains and of the chains in use, by targetKey.
	chains          map[string]chainAnswer
	targetEndpoints map[string][]endpoint
	// exposedChecks: see watched.
	exposedChecks *consulwatch.ExposedChecks
	pendingAt     time.Time
	missing       []string
	// use is the chain each upstream is served with (chooseChains), set
	// by the apply loop.
	use map[string]chainUse
	// unread are the upstreams given up on in this snapshot for the first
	// time (each is logged once), with why.
	unread []unreadUpstream
}

type unreadUpstream struct {
	key string
	err error
	// chain: the upstream's discovery chain, not its instances, could not
	// be read.
	chain bool
}

// snapshot copies the watched state and clears the pending time: the
// apply loop takes the change over.
func (w *watched) snapshot() snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	snap := snapshot{reg: w.reg, regErr: w.regErr, leaf: w.leaf, roots: w.roots, l7Sets: w.l7Sets,
		endpoints: map[string][]endpoint{}, pendingAt: w.pendingAt, exposedChecks: w.exposedChecks,
		chains: map[string]chainAnswer{}, targetEndpoints: map[string][]endpoint{}}
	w.pendingAt = time.Time{}
	now := time.Now()
	if snap.reg != nil {
		for _, u := range snap.reg.Upstreams {
			k := upstreamKey(u)
			eps, loaded := w.endpoints[k]
			if !loaded {
				if err := w.unreadLocked(k, now); err != nil {
					snap.unread = append(snap.unread, unreadUpstream{key: k, err: err})
				} else if uw := w.watching[k]; uw == nil || !uw.unread {
					snap.missing = append(snap.missing, "instances of "+k)
				}
			}
			snap.endpoints[k] = eps
			w.snapshotChainLocked(&snap, k, now)
		}
	} else {
		snap.missing = append(snap.missing, "proxy registration")
	}
	if snap.leaf == nil {
		snap.missing = append(snap.missing, "leaf certificate")
	}
	if snap.roots == nil {
		snap.missing = append(snap.missing, "CA roots")
	}
	return snap
}

// unreadLocked decides whether the upstream k, not loaded yet, is given up
// on now: its watch fails, or has not answered within upstreamGrace. It
// returns why the first time only; later calls return nil, and so does an
// upstream still worth waiting for.
func (w *watched) unreadLocked(k string, now time.Time) error {
	return unreadIn(w.watching[k], now)
}

// snapshotChainLocked adds upstream k's chain to snap, and the instances
// of its targets (those of the chain answered and of the one in use); a
// chain or a target not answered yet is waited for as an upstream's
// instances are, then given up on.
func (w *watched) snapshotChainLocked(snap *snapshot, k string, now time.Time) {
	if ans, ok := w.chains[k]; ok {
		snap.chains[k] = ans
	} else if cw := w.chainWatching[k]; cw != nil {
		if err := unreadIn(cw.upstreamWatch, now); err != nil {
			snap.unread = append(snap.unread, unreadUpstream{key: k, err: err, chain: true})
		} else if !cw.unread {
			snap.missing = append(snap.missing, "discovery chain of "+k)
		}
	}
	for _, p := range []*chain.Plan{snap.chains[k].plan, w.chainsInUse[k]} {
		if p == nil {
			continue
		}
		for _, t := range p.Targets {
			tk := targetKey(t)
			if _, done := snap.targetEndpoints[tk]; done {
				continue
			}
			eps, loaded := w.targetEndpoints[tk]
			if !loaded {
				if err := unreadIn(w.targetWatching[tk], now); err != nil {
					snap.unread = append(snap.unread, unreadUpstream{key: k + " target " + t.ID, err: err})
				} else if tw := w.targetWatching[tk]; tw == nil || !tw.unread {
					snap.missing = append(snap.missing, "instances of "+k+" target "+t.ID)
				}
			}
			snap.targetEndpoints[tk] = eps
		}
	}
}

// unreadIn is unreadLocked for the watch uw.
func unreadIn(uw *upstreamWatch, now time.Time) error {
	if uw == nil || uw.unread {
		return nil
	}
	switch {
	case uw.status.Failing() && uw.err != nil:
		uw.unread = true
		return uw.err
	case now.Sub(uw.started) >= upstreamGrace:
		uw.unread = true
		return fmt.Errorf("no answer from Consul within %s", upstreamGrace)
	}
	return nil
}
