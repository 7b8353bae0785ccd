package consulwatch

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestWatchBacksOffWhileTheAgentAnswersOnlyFromItsCache: an agent that
// cannot reach any server still answers a query without a wait index from
// its cache (the CA roots), while every blocking query fails at once ("No
// known Consul servers"). Seen on a real cluster with its servers down or
// its node cut off: the watch answered, failed, answered... every 100ms,
// logging each, for as long as the servers were gone. Only a blocking
// query's answer resets the backoff, so the retries space out.
func TestWatchBacksOffWhileTheAgentAnswersOnlyFromItsCache(t *testing.T) {
	var calls, recovered, failing atomic.Int64
	w := &Watch{
		Fetch: func(ctx context.Context, q *api.QueryOptions) (Result, error) {
			calls.Add(1)
			if q.WaitIndex != 0 {
				return Result{}, errors.New("Unexpected response code: 500 (No known Consul servers)")
			}
			return Result{Index: 42}, nil
		},
		OnFailing:   func(error) { failing.Add(1) },
		OnRecovered: func() { recovered.Add(1) },
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1600*time.Millisecond)
	defer cancel()
	w.Run(ctx)
	// Backing off 100, 200, 400, 800ms: four rounds of a cached answer and
	// a failure in 1.6s (sixteen with a backoff reset by each answer).
	if n := calls.Load(); n > 10 {
		t.Fatalf("%d queries in 1.6s (%d failing, %d recovered reports): the retries do not back off", n, failing.Load(), recovered.Load())
	}
	if !w.Status.IsLoaded() {
		t.Fatal("the cached answer does not count as an answer")
	}
}

// TestWatchResetsItsBackoffAfterABlockingAnswer: once a blocking query is
// answered, a new failure is retried after the shortest delay again.
func TestWatchResetsItsBackoffAfterABlockingAnswer(t *testing.T) {
	var calls atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var failedAt, retriedAt time.Time
	w := &Watch{
		Fetch: func(ctx context.Context, q *api.QueryOptions) (Result, error) {
			switch n := calls.Add(1); {
			case n <= 7: // failures and cached answers: the backoff grows to 800ms
				if q.WaitIndex != 0 {
					return Result{}, errors.New("no servers")
				}
				return Result{Index: 7}, nil
			case n == 8: // a blocking query answered: the servers are back
				if q.WaitIndex == 0 {
					t.Errorf("query %d carries no wait index", n)
				}
				return Result{Index: 8}, nil
			case n == 9:
				failedAt = time.Now()
				return Result{}, errors.New("agent restarting")
			default:
				retriedAt = time.Now()
				cancel()
				return Result{Index: 9}, nil
			}
		},
	}
	w.Run(ctx)
	if d := retriedAt.Sub(failedAt); d > 300*time.Millisecond {
		t.Fatalf("retried %v after a failure that followed a blocking answer, want the first delay (100ms)", d)
	}
}
