package authz

import (
	"context"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

func (a *Authorizer) watching() map[string]bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	out := map[string]bool{}
	for name := range a.destinations {
		out[name] = true
	}
	return out
}

// TestIdleDestinationsExpire: destinations met in requests stop being
// watched once nobody asks about them, so junk names cannot hold the
// slots for good; the destinations given to Start stay.
func TestIdleDestinationsExpire(t *testing.T) {
	c := harness.StartConsul(t)
	// At the limit a destination idle for a tenth of DestinationIdle makes
	// room: 200ms, well above the time three decisions take once Consul
	// answers (on a loaded machine a first answer alone took over 30ms).
	a, err := New(Config{Consul: c.Config(), MaxDestinations: 3, DestinationIdle: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a.Start(ctx, "api")
	web := c.IssueLeaf(t, "web").TLS.Certificate[0]
	// Consul answering (roots, api's intentions) before the clock matters.
	a.Decide("api", web)
	a.Decide("junk-1", web)
	a.Decide("junk-2", web)
	if d := a.Decide("junk-3", web); d.Reason != ReasonTooManyDestinations {
		t.Fatalf("a fourth destination at once: %s, want %s", d.Reason, ReasonTooManyDestinations)
	}
	harness.WaitFor(t, 15*time.Second, "idle destinations dropped", func() bool {
		w := a.watching()
		return len(w) == 1 && w["api"]
	})
	for _, name := range []string{"junk-3", "junk-4"} {
		if d := a.Decide(name, web); d.Reason == ReasonTooManyDestinations {
			t.Fatalf("%s after the idle ones expired: %s", name, d.Reason)
		}
	}
}
