package sidecar

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulwatch"
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
	// endpoints are the instances of each upstream (by key), from its
	// watch's first answer on: a key that is absent is not loaded yet.
	// Each slice is replaced whole, never changed in place.
	endpoints map[string][]endpoint
	watching  map[string]*upstreamWatch
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
	return watched{changed: make(chan struct{}, 1), endpoints: map[string][]endpoint{}, watching: map[string]*upstreamWatch{}}
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
	endpoints map[string][]endpoint
	// exposedChecks: see watched.
	exposedChecks *consulwatch.ExposedChecks
	pendingAt     time.Time
	missing       []string
	// unread are the upstreams given up on in this snapshot for the first
	// time (each is logged once), with why.
	unread []unreadUpstream
}

type unreadUpstream struct {
	key string
	err error
}

// snapshot copies the watched state and clears the pending time: the
// apply loop takes the change over.
func (w *watched) snapshot() snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	snap := snapshot{reg: w.reg, regErr: w.regErr, leaf: w.leaf, roots: w.roots,
		endpoints: map[string][]endpoint{}, pendingAt: w.pendingAt, exposedChecks: w.exposedChecks}
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
	uw := w.watching[k]
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
