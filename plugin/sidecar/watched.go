package sidecar

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
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
	watching  map[string]context.CancelFunc
	pendingAt time.Time // first change not yet applied
}

func newWatched() watched {
	return watched{changed: make(chan struct{}, 1), endpoints: map[string][]endpoint{}, watching: map[string]context.CancelFunc{}}
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
	pendingAt time.Time
	missing   []string
}

// snapshot copies the watched state and clears the pending time: the
// apply loop takes the change over.
func (w *watched) snapshot() snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	snap := snapshot{reg: w.reg, regErr: w.regErr, leaf: w.leaf, roots: w.roots,
		endpoints: map[string][]endpoint{}, pendingAt: w.pendingAt}
	w.pendingAt = time.Time{}
	if snap.reg != nil {
		for _, u := range snap.reg.Upstreams {
			k := upstreamKey(u)
			eps, loaded := w.endpoints[k]
			if !loaded {
				snap.missing = append(snap.missing, "instances of "+k)
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
