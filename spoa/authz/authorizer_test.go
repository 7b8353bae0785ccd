package authz_test

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/spoa/authz"
)

func start(t testing.TB, c *harness.Consul, targets ...string) *authz.Authorizer {
	t.Helper()
	return startWith(t, c, authz.Config{}, targets...)
}

func expect(t *testing.T, a *authz.Authorizer, target string, der []byte, allow bool, reason authz.Reason) {
	t.Helper()
	harness.WaitFor(t, 2*time.Second, "decision "+reason.String(), func() bool {
		d := a.Decide(target, der)
		return d.Allow == allow && d.Reason == reason
	})
}

// TestDecisionsFollowConsul checks each decision path against a real agent,
// and that the agent's own authorize endpoint agrees wherever it decides.
func TestDecisionsFollowConsul(t *testing.T) {
	c := harness.StartConsul(t)
	a := start(t, c, "api")
	web, batch := c.IssueLeaf(t, "web").TLS.Certificate[0], c.IssueLeaf(t, "batch").TLS.Certificate[0]

	t.Run("no intention: the ACL default (allow with ACLs off)", func(t *testing.T) {
		expect(t, a, "api", web, true, authz.ReasonDefaultAllow)
	})
	t.Run("exact source beats wildcard source", func(t *testing.T) {
		c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow), harness.Source("*", api.IntentionActionDeny))
		expect(t, a, "api", web, true, authz.ReasonIntentionAllow)
		expect(t, a, "api", batch, false, authz.ReasonIntentionDeny)
	})
	t.Run("a wildcard-destination intention applies and its change is seen", func(t *testing.T) {
		c.DeleteIntentions(t, "api")
		c.SetIntentions(t, "*", harness.Source("*", api.IntentionActionDeny))
		expect(t, a, "api", web, false, authz.ReasonIntentionDeny)
		c.DeleteIntentions(t, "*")
		expect(t, a, "api", web, true, authz.ReasonDefaultAllow)
	})
	t.Run("an L7 intention admits the caller and decides each request", func(t *testing.T) {
		c.SetProtocol(t, "api", "http")
		c.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{{
			Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/v1"},
		}}})
		expect(t, a, "api", web, true, authz.ReasonL7Intention)
		d := a.Decide("api", web)
		if d.L7Mode() != 1 {
			t.Fatalf("l7 mode %d, want 1 (method and path)", d.L7Mode())
		}
		if ok, r := d.CheckRequest(&authz.Request{Method: "GET", Path: "/v1/x"}); !ok || r != authz.ReasonL7PermissionAllow {
			t.Fatalf("GET /v1/x: %v %s", ok, r)
		}
		// No permission matches: the ACL default (allow with ACLs off).
		if ok, r := d.CheckRequest(&authz.Request{Method: "GET", Path: "/v2"}); !ok || r != authz.ReasonL7DefaultAllow {
			t.Fatalf("GET /v2: %v %s", ok, r)
		}
		c.DeleteIntentions(t, "api")
	})
	t.Run("the agent's authorize endpoint agrees", func(t *testing.T) {
		c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow), harness.Source("*", api.IntentionActionDeny))
		for _, tc := range []struct {
			name string
			der  []byte
			uri  string
		}{{"web", web, "web"}, {"batch", batch, "batch"}} {
			leaf := c.IssueLeaf(t, tc.uri)
			expect(t, a, "api", tc.der, tc.name == "web", map[bool]authz.Reason{true: authz.ReasonIntentionAllow, false: authz.ReasonIntentionDeny}[tc.name == "web"])
			res, err := c.Client.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: "api", ClientCertURI: leaf.URI})
			if err != nil {
				t.Fatal(err)
			}
			if d := a.Decide("api", tc.der); d.Allow != res.Authorized {
				t.Fatalf("%s: haconnect says %v (%s), the agent %v (%s)", tc.name, d.Allow, d.Reason, res.Authorized, res.Reason)
			}
		}
	})
	t.Run("Recheck decides an open connection's caller by its SPIFFE ID", func(t *testing.T) {
		c.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow), harness.Source("*", api.IntentionActionDeny))
		webURI, batchURI := c.IssueLeaf(t, "web").URI, c.IssueLeaf(t, "batch").URI
		expect(t, a, "api", web, true, authz.ReasonIntentionAllow)
		for _, tc := range []struct {
			uri    string
			allow  bool
			reason authz.Reason
		}{
			{webURI, true, authz.ReasonIntentionAllow},
			{batchURI, false, authz.ReasonIntentionDeny},
			{"spiffe://other.consul/ns/default/dc/dc1/svc/web", false, authz.ReasonTrustDomain},
			{"spiffe://x/not/a/service", false, authz.ReasonNotService},
			{"not a SPIFFE ID", false, authz.ReasonNotSPIFFE},
		} {
			d := a.Recheck("api", tc.uri)
			if d == nil || d.Allow != tc.allow || d.Reason != tc.reason {
				t.Errorf("Recheck(%q) = %+v, want allow=%v %s", tc.uri, d, tc.allow, tc.reason)
			}
		}
	})
	t.Run("a caller from another trust domain stays denied when a wildcard allows", func(t *testing.T) {
		c.DeleteIntentions(t, "api")
		impostor := harness.NewForeignCA(t).Issue(t, "spiffe://other.consul/ns/default/dc/dc1/svc/web").TLS.Certificate[0]
		expect(t, a, "api", impostor, false, authz.ReasonTrustDomain) // now cached
		c.SetIntentions(t, "api", harness.Source("*", api.IntentionActionAllow))
		expect(t, a, "api", web, true, authz.ReasonIntentionAllow) // the change has been applied...
		// ...and the cached denial was re-evaluated with it.
		if d := a.Decide("api", impostor); d.Allow || d.Reason != authz.ReasonTrustDomain {
			t.Fatalf("impostor after a * allow: %v %s, want deny %s", d.Allow, d.Reason, authz.ReasonTrustDomain)
		}
		c.DeleteIntentions(t, "api")
	})
	t.Run("bad input is denied with its reason", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			target string
			der    []byte
			reason authz.Reason
		}{
			{"no certificate", "api", nil, authz.ReasonNoCertificate},
			{"garbage", "api", []byte("not a certificate"), authz.ReasonBadCertificate},
			{"no target", "", web, authz.ReasonNoDestination},
		} {
			if d := a.Decide(tc.target, tc.der); d.Allow || d.Reason != tc.reason {
				t.Errorf("%s: %v %s, want deny %s", tc.name, d.Allow, d.Reason, tc.reason)
			}
		}
	})
}

func TestDestinationsAreBounded(t *testing.T) {
	c := harness.StartConsul(t)
	a, err := authz.New(authz.Config{Consul: c.Config(), MaxDestinations: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a.Start(ctx)
	web := c.IssueLeaf(t, "web").TLS.Certificate[0]
	a.Decide("one", web)
	a.Decide("two", web)
	if d := a.Decide("three", web); d.Allow || d.Reason != authz.ReasonTooManyDestinations {
		t.Fatalf("third destination: %v %s, want deny too_many_targets", d.Allow, d.Reason)
	}
}

// BenchmarkDecideCacheHit measures the hot path: a caller already decided.
func BenchmarkDecideCacheHit(b *testing.B) {
	c := harness.StartConsul(b)
	c.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
	a := start(b, c, "api")
	web := c.IssueLeaf(b, "web").TLS.Certificate[0]
	if d := a.Decide("api", web); !d.Allow {
		b.Fatalf("warm-up decision: %s", d.Reason)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if d := a.Decide("api", web); !d.Allow {
				b.Fatal("denied")
			}
		}
	})
}

// BenchmarkDecideCacheMiss measures a first decision for a caller: parsing
// its certificate, checking its trust domain and walking the intentions (no
// Consul call). The cache holds one entry and callers rotate, so every call
// misses. The callers are 16 services with leaves from Consul, which the
// intention allows: each miss verifies the chain too.
func BenchmarkDecideCacheMiss(b *testing.B) {
	c := harness.StartConsul(b)
	c.SetIntentions(b, "api", harness.Source("*", api.IntentionActionAllow))
	certs := c.Callers(b, "web", 16)
	a, err := authz.New(authz.Config{Consul: c.Config(), MaxEntries: 1})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a.Start(ctx, "api")
	if err := a.Ready(ctx, "api"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if d := a.Decide("api", certs[i%len(certs)]); !d.Allow {
			b.Fatalf("denied: %s", d.Reason)
		}
	}
}
