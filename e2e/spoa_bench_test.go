package e2e

import (
	"context"
	"encoding/pem"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/negasus/haproxy-spoe-go/request"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
)

// runningAgent starts the SPOA in-process with a real authorizer against a
// real Consul, warmed up for the callers of api: web (an L4 intention),
// batch (HTTP permissions on method and path) and fresh (on a header too).
// It returns the server, its address and the callers' certificates by
// caller.
func runningAgent(b *testing.B) (*spoa.Server, string, map[string][]byte) {
	b.Helper()
	c := harness.StartConsul(b)
	c.SetProtocol(b, "api", "http")
	deny := &api.IntentionPermission{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}}
	c.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow),
		&api.SourceIntention{Name: "batch", Permissions: []*api.IntentionPermission{deny, {Action: api.IntentionActionAllow,
			HTTP: &api.IntentionHTTPPermission{PathPrefix: "/api/", Methods: []string{"GET", "HEAD"}}}}},
		&api.SourceIntention{Name: "fresh", Permissions: []*api.IntentionPermission{deny, {Action: api.IntentionActionAllow,
			HTTP: &api.IntentionHTTPPermission{PathPrefix: "/api/", Header: []api.IntentionHTTPHeaderPermission{{Name: "x-tenant", Exact: "blue"}}}}}})
	certs := map[string][]byte{}
	for _, caller := range []string{"web", "batch", "fresh"} {
		blk, _ := pem.Decode([]byte(c.IssueLeaf(b, caller).CertPEM))
		certs[caller] = blk.Bytes
	}
	az, err := authz.New(authz.Config{Consul: c.Config(), Metrics: authz.NewMetrics(nil)})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	az.Start(ctx, "api")
	if err := az.Ready(ctx, "api"); err != nil {
		b.Fatal(err)
	}
	srv, err := spoa.NewServer(spoa.Config{Decider: az, Destination: "api"})
	if err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(ctx, l) }()
	for caller, cert := range certs {
		if d := az.Decide("api", cert); !d.Allow {
			b.Fatalf("warm-up %s: %s", caller, d.Reason)
		}
	}
	return srv, l.Addr().String(), certs
}

// BenchmarkSPOERoundTrip is one HAProxy-side request/answer over loopback
// against the running agent (guard, SPOE library, handler, cached decision).
func BenchmarkSPOERoundTrip(b *testing.B) {
	_, addr, certs := runningAgent(b)
	cert := certs["web"]
	b.Run("sequential", func(b *testing.B) {
		c, err := spoptest.Dial("tcp", addr, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := c.Notify(spoa.MessageName, spoptest.ArgValue{Name: spoa.ArgCert, Value: cert}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel-16-conns", func(b *testing.B) {
		b.SetParallelism(8) // 8 x GOMAXPROCS(2) = 16 connections
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			c, err := spoptest.Dial("tcp", addr, 5*time.Second)
			if err != nil {
				b.Error(err)
				return
			}
			defer c.Close()
			for pb.Next() {
				if _, err := c.Notify(spoa.MessageName, spoptest.ArgValue{Name: spoa.ArgCert, Value: cert}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkHandle is the agent's own work per message, without the network:
// the handler reading the arguments, deciding (cache hit) and setting the
// variables. l4 is the connection-level check; l7 and l7+headers are the
// per-request checks of callers whose intentions carry HTTP permissions.
func BenchmarkHandle(b *testing.B) {
	srv, _, certs := runningAgent(b)
	headers := []byte{}
	for _, h := range [][2]string{{"host", "api"}, {"user-agent", "bench/1.0"}, {"accept", "*/*"}, {"x-tenant", "blue"}, {"", ""}} {
		headers = append(headers, byte(len(h[0])))
		headers = append(headers, h[0]...)
		headers = append(headers, byte(len(h[1])))
		headers = append(headers, h[1]...)
	}
	for _, bc := range []struct {
		name, message string
		args          []spoptest.ArgValue
	}{
		{"l4", spoa.MessageName, []spoptest.ArgValue{{Name: spoa.ArgCert, Value: certs["web"]}}},
		{"l7", spoa.MessageL7, []spoptest.ArgValue{{Name: spoa.ArgCert, Value: certs["batch"]},
			{Name: spoa.ArgMethod, Value: "GET"}, {Name: spoa.ArgPath, Value: "/api/items?page=2"}}},
		{"l7+headers", spoa.MessageL7WithHeaders, []spoptest.ArgValue{{Name: spoa.ArgCert, Value: certs["fresh"]},
			{Name: spoa.ArgMethod, Value: "GET"}, {Name: spoa.ArgPath, Value: "/api/items?page=2"},
			{Name: spoa.ArgHeaders, Value: headers}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var e spoptest.Encoder
			frame := e.Notify(1, 1, bc.message, bc.args...)
			payload := append([]byte(nil), frame[4+7:]...) // after length, type, flags, stream-id, frame-id
			req := request.AcquireRequest()
			if err := req.Messages.Decode(payload); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req.Actions = req.Actions[:0]
				srv.Handle(req)
			}
			b.StopTimer()
			if len(req.Actions) == 0 {
				b.Fatal("no variables set")
			}
			// The answer must be an allow, or the benchmark measures a denial.
			for _, a := range req.Actions {
				if (a.Name == spoa.VarAuth || a.Name == spoa.VarL7Auth) && a.Value != true {
					b.Fatalf("%s answered %s=%v", bc.name, a.Name, a.Value)
				}
			}
		})
	}
}
