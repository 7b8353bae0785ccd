package e2e

import (
	"context"
	"encoding/pem"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/negasus/haproxy-spoe-go/request"

	"github.com/haconnect/haconnect/internal/harness"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
)

// runningAgent starts the SPOA in-process with a real authorizer against a
// real Consul, warmed up for caller web -> api.
func runningAgent(b *testing.B) (*spoa.Server, string, []byte) {
	b.Helper()
	c := harness.StartConsul(b)
	c.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
	blk, _ := pem.Decode([]byte(c.IssueLeaf(b, "web").CertPEM))
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
	srv, err := spoa.NewServer(spoa.Config{Decider: az, Target: "api"})
	if err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(ctx, l) }()
	if d := az.Decide("api", blk.Bytes); !d.Allow {
		b.Fatalf("warm-up: %s", d.Reason)
	}
	return srv, l.Addr().String(), blk.Bytes
}

// BenchmarkSPOERoundTrip is one HAProxy-side request/answer over loopback
// against the running agent (guard, SPOE library, handler, cached decision).
func BenchmarkSPOERoundTrip(b *testing.B) {
	_, addr, cert := runningAgent(b)
	b.Run("sequential", func(b *testing.B) {
		c, err := spop.Dial("tcp", addr, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := c.Notify(spoa.MessageName, spop.ArgValue{Name: spoa.ArgCert, Value: cert}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel-16-conns", func(b *testing.B) {
		b.SetParallelism(8) // 8 x GOMAXPROCS(2) = 16 connections
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			c, err := spop.Dial("tcp", addr, 5*time.Second)
			if err != nil {
				b.Error(err)
				return
			}
			defer c.Close()
			for pb.Next() {
				if _, err := c.Notify(spoa.MessageName, spop.ArgValue{Name: spoa.ArgCert, Value: cert}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkHandle is the agent's own work per message, without the network:
// the handler reading the arguments, deciding (cache hit) and setting the
// variables.
func BenchmarkHandle(b *testing.B) {
	srv, _, cert := runningAgent(b)
	var e spop.Encoder
	frame := e.Notify(1, 1, spoa.MessageName, spop.ArgValue{Name: spoa.ArgCert, Value: cert})
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
}
