package authz_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/spoa/authz"
)

// startWith starts an authorizer with cfg (its Consul and Metrics filled
// in when empty) watching targets, and waits until they are loaded.
func startWith(t testing.TB, c *harness.Consul, cfg authz.Config, targets ...string) *authz.Authorizer {
	t.Helper()
	if cfg.Consul == nil {
		cfg.Consul = c.Config()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = authz.NewMetrics(nil)
	}
	a, err := authz.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a.Start(ctx, targets...)
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	defer rcancel()
	if err := a.Ready(rctx, targets...); err != nil {
		t.Fatalf("authorizer not ready: %v", err)
	}
	return a
}

// changes counts OnChange calls per destination.
type changes struct{ api, other atomic.Int32 }

func (c *changes) record(target string) {
	if target == "api" {
		c.api.Add(1)
	} else {
		c.other.Add(1)
	}
}

// TestStaleWindowCountsPerDestination: with Consul's servers gone the
// local agent still answers its cached CA roots, but not the intentions.
// A cached decision must then be served only for the stale window counted
// from the last answer about that destination's intentions, and holders
// of open connections must be told when it runs out. Then Consul comes back
// and everything recovers by itself.
func TestStaleWindowCountsPerDestination(t *testing.T) {
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow))
	filter := harness.NewConsulFilter(t, c)
	var seen changes
	window := 2 * time.Second
	a := startWith(t, c, authz.Config{Consul: filter.Config(), StaleWindow: window, OnChange: seen.record}, "api")
	web := c.IssueLeaf(t, "web").TLS.Certificate[0]
	batch := c.IssueLeaf(t, "batch").TLS.Certificate[0]
	expect(t, a, "api", web, true, authz.ReasonIntentionAllow)

	// The servers are gone: everything but the agent's own CA roots fails.
	filter.Fail("/v1/connect/intentions", "", 500, "No cluster leader")
	filter.Fail("/v1/discovery-chain/", "", 500, "No cluster leader")
	filter.Fail("/v1/agent/connect/authorize", "", 500, "No cluster leader")
	cut := time.Now()
	harness.WaitFor(t, 5*time.Second, "a new caller denied while Consul fails", func() bool {
		return a.Decide("api", batch).Reason == authz.ReasonConsulUnavailable
	})
	if d := a.Decide("api", web); !d.Allow {
		t.Fatalf("a cached caller within the stale window: %s, want it served", d.Reason)
	}
	before := seen.api.Load()
	took := harness.WaitFor(t, 3*window, "the cached caller denied past the stale window", func() bool {
		return a.Decide("api", web).Reason == authz.ReasonConsulStale
	})
	if since := time.Since(cut); since < window {
		t.Fatalf("denied %v after the cut, before the %v window ran out", since, window)
	}
	t.Logf("cached caller denied %v after the first check past the cut (window %v)", took, window)
	harness.WaitFor(t, 2*time.Second, "open connections told", func() bool { return seen.api.Load() > before })
	if d := a.Recheck("api", c.IssueLeaf(t, "web").URI); d == nil || d.Allow || d.Reason != authz.ReasonConsulStale {
		t.Fatalf("Recheck past the window: %+v, want deny %s", d, authz.ReasonConsulStale)
	}

	filter.Clear()
	expect(t, a, "api", web, true, authz.ReasonIntentionAllow)
}

// TestRefusedDestinationIsIsolated: a destination Consul refuses (the token
// cannot read its intentions) denies its own callers only.
func TestRefusedDestinationIsIsolated(t *testing.T) {
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow), harness.Source("*", api.IntentionActionDeny))
	filter := harness.NewConsulFilter(t, c)
	filter.Fail("/v1/connect/intentions/match", "name=secret", 403, "Permission denied: token lacks permission 'intention:read' on \"secret\"")
	a := startWith(t, c, authz.Config{Consul: filter.Config()}, "api")
	web := c.IssueLeaf(t, "web").TLS.Certificate[0]
	batch := c.IssueLeaf(t, "batch").TLS.Certificate[0]

	if d := a.Decide("secret", web); d.Allow || d.Reason != authz.ReasonConsulUnavailable {
		t.Fatalf("caller of the refused destination: %v %s, want deny %s", d.Allow, d.Reason, authz.ReasonConsulUnavailable)
	}
	// New callers of the healthy destination are still decided.
	expect(t, a, "api", web, true, authz.ReasonIntentionAllow)
	expect(t, a, "api", batch, false, authz.ReasonIntentionDeny)
}

// TestCertificatesAreVerified: a certificate that does not chain to
// Consul's roots, or is outside its validity period, is denied whatever
// the intentions say, and takes no place in the cache.
func TestCertificatesAreVerified(t *testing.T) {
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("*", api.IntentionActionAllow))
	_, td := c.RootsPEM(t)
	web := "spiffe://" + td + "/ns/default/dc/dc1/svc/web"
	a := startWith(t, c, authz.Config{MaxEntries: 1}, "api")
	genuine := c.IssueLeaf(t, "web").TLS.Certificate[0]
	expect(t, a, "api", genuine, true, authz.ReasonIntentionAllow)

	forged := harness.NewForeignCA(t).Issue(t, web).TLS.Certificate[0]
	if d := a.Decide("api", forged); d.Allow || d.Reason != authz.ReasonUntrustedCertificate {
		t.Fatalf("a certificate with Consul's trust domain from another CA: %v %s, want deny %s", d.Allow, d.Reason, authz.ReasonUntrustedCertificate)
	}

	mesh := c.MeshCA(t) // a CA Consul trusts, whose key the test holds
	probe := mesh.IssueValid(t, web, time.Now().Add(-time.Minute), time.Now().Add(time.Hour)).TLS.Certificate[0]
	harness.WaitFor(t, 10*time.Second, "the authorizer to follow the new root", func() bool { return a.Decide("api", probe).Allow })
	now := time.Now()
	for _, tc := range []struct {
		name     string
		from, to time.Time
		allow    bool
		reason   authz.Reason
	}{
		{"expired a minute ago", now.Add(-time.Hour), now.Add(-time.Minute), false, authz.ReasonCertificateExpired},
		{"valid in ten minutes", now.Add(10 * time.Minute), now.Add(time.Hour), false, authz.ReasonCertificateNotYetValid},
		{"valid now", now.Add(-time.Minute), now.Add(time.Hour), true, authz.ReasonIntentionAllow},
	} {
		der := mesh.IssueValid(t, web, tc.from, tc.to).TLS.Certificate[0]
		for i := 0; i < 2; i++ { // the second time would be a cache hit
			if d := a.Decide("api", der); d.Allow != tc.allow || d.Reason != tc.reason {
				t.Errorf("%s (decision %d): %v %s, want %v %s", tc.name, i+1, d.Allow, d.Reason, tc.allow, tc.reason)
			}
		}
	}
}

// TestCachedCallerExpires: a cached allow is not served once the
// certificate has expired, on a keep-alive re-check for instance.
func TestCachedCallerExpires(t *testing.T) {
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("*", api.IntentionActionAllow))
	_, td := c.RootsPEM(t)
	mesh := c.MeshCA(t)
	a := startWith(t, c, authz.Config{}, "api") // after the CA change: its roots include the test CA
	now := time.Now()
	der := mesh.IssueValid(t, "spiffe://"+td+"/ns/default/dc/dc1/svc/web", now.Add(-time.Minute), now.Add(1500*time.Millisecond)).TLS.Certificate[0]
	if d := a.Decide("api", der); !d.Allow {
		t.Fatalf("before expiry: %s", d.Reason)
	}
	harness.WaitFor(t, 5*time.Second, "the expired caller denied", func() bool {
		return a.Decide("api", der).Reason == authz.ReasonCertificateExpired
	})
}

// TestRecheckRetriesUntilItDecides: when an open connection's caller
// cannot be decided (the default policy cannot be learned), OnChange is
// called again until it can, so the stream is not left open for good.
func TestRecheckRetriesUntilItDecides(t *testing.T) {
	c := harness.StartConsul(t, `acl { enabled = false }`)
	c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionDeny))
	filter := harness.NewConsulFilter(t, c)
	var seen changes
	a := startWith(t, c, authz.Config{Consul: filter.Config(), DefaultPolicyTTL: time.Millisecond, OnChange: seen.record}, "api")
	webURI := c.IssueLeaf(t, "web").URI
	if d := a.Recheck("api", webURI); d == nil || d.Allow {
		t.Fatalf("Recheck with a deny intention: %+v", d)
	}
	filter.Fail("/v1/agent/connect/authorize", "", 500, "rpc error")
	c.DeleteIntentions(t, "api") // now the default policy decides, and cannot be learned
	harness.WaitFor(t, 5*time.Second, "Recheck cannot tell", func() bool { return a.Recheck("api", webURI) == nil })
	before := seen.api.Load()
	// Each poll is what the holder of the open connection does when told:
	// it rechecks, cannot tell, and must be told again.
	harness.WaitFor(t, 5*time.Second, "OnChange called again", func() bool {
		return a.Recheck("api", webURI) == nil && seen.api.Load() >= before+2
	})
	filter.Clear()
	harness.WaitFor(t, 5*time.Second, "Recheck decides once the default policy is learned", func() bool {
		d := a.Recheck("api", webURI)
		return d != nil && d.Allow && d.Reason == authz.ReasonDefaultAllow
	})
}

// TestNativeSetsWithdrawnPastStaleWindow: the native L7 sets HAProxy
// matches without asking the SPOA are listed only while the intentions
// are fresh. Past the stale window the list is empty (the sidecar
// withdraws the sets from HAProxy's maps, so that every request asks the
// SPOA, which denies it), and holders are told; when Consul answers again
// they are back.
func TestNativeSetsWithdrawnPastStaleWindow(t *testing.T) {
	c := harness.StartConsul(t)
	c.SetProtocol(t, "api", "http")
	c.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
	}})
	filter := harness.NewConsulFilter(t, c)
	var seen changes
	window := 2 * time.Second
	a := startWith(t, c, authz.Config{Consul: filter.Config(), StaleWindow: window, OnChange: seen.record}, "api")
	harness.WaitFor(t, 5*time.Second, "the native set listed", func() bool { return len(a.NativeSets("api")) == 1 })
	web := c.IssueLeaf(t, "web").TLS.Certificate[0]
	if id, _ := a.Decide("api", web).NativeSetID(); id != a.NativeSets("api")[0].ID {
		t.Fatalf("the caller's decision names set %q, want the listed one", id)
	}

	filter.Fail("/v1/connect/intentions", "", 500, "No cluster leader")
	cut := time.Now()
	before := seen.api.Load()
	harness.WaitFor(t, 3*window, "the native sets withdrawn", func() bool { return len(a.NativeSets("api")) == 0 })
	if since := time.Since(cut); since < window {
		t.Fatalf("withdrawn %v after the cut, before the %v window ran out", since, window)
	}
	if d := a.Decide("api", web); d.Allow || d.Reason != authz.ReasonConsulStale {
		t.Fatalf("the caller past the window: %s, want denied %s", d.Reason, authz.ReasonConsulStale)
	}
	harness.WaitFor(t, 2*time.Second, "holders told", func() bool { return seen.api.Load() > before })

	told := seen.api.Load()
	filter.Clear()
	harness.WaitFor(t, 10*time.Second, "the native set back", func() bool { return len(a.NativeSets("api")) == 1 })
	harness.WaitFor(t, 2*time.Second, "holders told it is back", func() bool { return seen.api.Load() > told })
}
