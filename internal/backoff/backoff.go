// Package backoff spaces out the retries of a failing call: the delay
// doubles from Initial up to Max, and a success starts it over.
package backoff

import (
	"context"
	"time"
)

// Backoff is the delay before the next retry. It is not safe for
// concurrent use: each retry loop has its own.
type Backoff struct {
	initial, max, next time.Duration
}

// New starts at initial and doubles up to max.
func New(initial, max time.Duration) *Backoff {
	return &Backoff{initial: initial, max: max, next: initial}
}

// Next is the delay the next Wait sleeps.
func (b *Backoff) Next() time.Duration { return b.next }

// Reset starts over at the initial delay, after a success.
func (b *Backoff) Reset() { b.next = b.initial }

// Wait sleeps for the current delay and doubles it; false if ctx ended
// first.
func (b *Backoff) Wait(ctx context.Context) bool {
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(b.next*2, b.max)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
