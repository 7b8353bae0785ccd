package sidecar

import (
	"context"
	"time"

	"github.com/hashicorp/consul/api"
)

// blockingResult is where a blocking query left off: an index, or a content
// hash for the agent's local endpoints.
type blockingResult struct {
	index uint64
	hash  string
}

// watch runs a blocking query until ctx is done, retrying with backoff and
// logging once when it starts failing and once when it recovers.
func (s *Sidecar) watch(ctx context.Context, what string,
	fetch func(ctx context.Context, q *api.QueryOptions) (blockingResult, error)) {
	var last blockingResult
	backoff := newBackoff()
	failing := false
	for ctx.Err() == nil {
		q := &api.QueryOptions{WaitIndex: last.index, WaitHash: last.hash, WaitTime: 5 * time.Minute}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Minute+30*time.Second)
		res, err := fetch(qctx, q)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.metrics.consulErrors.Inc()
			if !failing {
				s.log.Warn("consul query failing: keeping the running configuration and retrying",
					"watch", what, "error", err)
				failing = true
			}
			last = blockingResult{}
			if !backoff.wait(ctx) {
				return
			}
			continue
		}
		if failing {
			s.log.Info("consul query recovered", "watch", what)
			failing = false
		}
		backoff.reset()
		if res.index < last.index {
			res.index = 0
		}
		last = res
	}
}

// backoff doubles from 100ms to 5s.
type backoff struct{ next time.Duration }

func newBackoff() *backoff { return &backoff{next: 100 * time.Millisecond} }

func (b *backoff) peek() time.Duration { return b.next }

func (b *backoff) reset() { b.next = 100 * time.Millisecond }

// wait sleeps for the current delay and doubles it; false if ctx ended.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(b.next*2, 5*time.Second)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
