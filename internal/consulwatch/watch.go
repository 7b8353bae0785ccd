// Package consulwatch runs Consul blocking queries: one loop that retries
// with backoff, bounds each query with a timeout, resets an index that goes
// backwards, and reports once when a query starts failing and once when it
// recovers. Each watched thing has a Status that answers "how old is what I
// know about it", which is what a stale window is measured against.
package consulwatch

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/backoff"
)

// Status is what is known about one watched thing: whether Consul answered
// at least once, whether the last attempt failed, and when Consul last
// answered. It is safe for concurrent use.
type Status struct {
	loaded     chan struct{}
	loadedOnce sync.Once
	failing    atomic.Bool
	lastAnswer atomic.Int64 // unix nanoseconds; 0 before the first answer
}

// NewStatus returns the status of a thing not loaded yet.
func NewStatus() *Status { return &Status{loaded: make(chan struct{})} }

// Loaded is closed after Consul's first answer.
func (s *Status) Loaded() <-chan struct{} { return s.loaded }

// IsLoaded reports whether Consul answered at least once.
func (s *Status) IsLoaded() bool {
	select {
	case <-s.loaded:
		return true
	default:
		return false
	}
}

// Failing reports whether the last attempt failed.
func (s *Status) Failing() bool { return s.failing.Load() }

// Age is how long ago Consul last answered; a thing never loaded is
// infinitely old.
func (s *Status) Age(now time.Time) time.Duration {
	last := s.lastAnswer.Load()
	if last == 0 {
		return time.Duration(1<<63 - 1)
	}
	return time.Duration(now.UnixNano() - last)
}

// Fresh reports whether Consul answered within window. A healthy blocking
// query answers at least once per wait time, so a caller's window must be
// longer than the wait time (with Consul's jitter of up to 1/16 of it).
func (s *Status) Fresh(now time.Time, window time.Duration) bool {
	return s.Age(now) <= window
}

// answered records a successful answer at now.
func (s *Status) answered(now time.Time) (recovered bool) {
	s.lastAnswer.Store(now.UnixNano())
	s.loadedOnce.Do(func() { close(s.loaded) })
	return s.failing.Swap(false)
}

// failed records a failed attempt; first says whether it is the first
// failure since the last answer.
func (s *Status) failed() (first bool) { return !s.failing.Swap(true) }

// Result is where a blocking query left off: Consul's index, or a content
// hash for the agent's local endpoints that answer with one.
type Result struct {
	Index uint64
	Hash  string
}

// Fetch runs one blocking query with q's wait index, hash and time; ctx
// bounds it.
type Fetch func(ctx context.Context, q *api.QueryOptions) (Result, error)

// Watch is one blocking query and what to do around it.
type Watch struct {
	// Fetch runs the query and applies its answer.
	Fetch Fetch
	// Status is updated after every attempt (nil: Run makes one nobody
	// reads).
	Status *Status
	// WaitTime is the blocking queries' wait (default 5m). Each query is
	// given WaitTime plus a margin before it is abandoned.
	WaitTime time.Duration
	// Backoff spaces retries after a failure (default 100ms doubling to 5s).
	Backoff *backoff.Backoff
	// OnFailing is called on the first failure after an answer (or at
	// start); OnError on every failure (e.g. to count it); OnRecovered on
	// the first answer after a failure. All may be nil.
	OnFailing   func(err error)
	OnError     func(err error)
	OnRecovered func()
}

// Run runs the query until ctx is done.
func (w *Watch) Run(ctx context.Context) {
	if w.Status == nil {
		w.Status = NewStatus()
	}
	wait := w.WaitTime
	if wait <= 0 {
		wait = 5 * time.Minute
	}
	// Consul adds up to wait/16 of jitter; past that, plus a margin for a
	// slow network, the query is considered hung.
	timeout := wait + wait/16 + 15*time.Second
	retry := w.Backoff
	if retry == nil {
		retry = backoff.New(100*time.Millisecond, 5*time.Second)
	}
	var last Result
	for ctx.Err() == nil {
		q := &api.QueryOptions{WaitIndex: last.Index, WaitHash: last.Hash, WaitTime: wait}
		qctx, cancel := context.WithTimeout(ctx, timeout)
		res, err := w.Fetch(qctx, q.WithContext(qctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if w.OnError != nil {
				w.OnError(err)
			}
			if w.Status.failed() && w.OnFailing != nil {
				w.OnFailing(err)
			}
			last = Result{}
			if !retry.Wait(ctx) {
				return
			}
			continue
		}
		if w.Status.answered(time.Now()) && w.OnRecovered != nil {
			w.OnRecovered()
		}
		// Only a blocking query's answer resets the backoff. The query
		// after a failure carries no index, and an agent that cannot
		// reach any server still answers it from its cache (the CA
		// roots) while its blocking queries fail at once: reset there,
		// the watch would answer, fail and retry every 100ms for as long
		// as the servers are gone.
		if q.WaitIndex != 0 || q.WaitHash != "" {
			retry.Reset()
		}
		if res.Index < last.Index { // the index went backwards (e.g. a snapshot restore): start over
			res.Index = 0
		}
		last = res
	}
}
