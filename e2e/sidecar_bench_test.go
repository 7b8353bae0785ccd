package e2e

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// BenchmarkSidecarApplyLatency measures the time from a Consul change (a new
// upstream instance registered, then deregistered) to web's HAProxy serving
// with it, through the blocking query, render and runtime API. It reports
// the p50 and p99 of each kind over the iterations; the Consul agent and
// the sidecar are set up once (b.Loop).
func BenchmarkSidecarApplyLatency(b *testing.B) {
	m := &mesh{consul: harness.StartConsul(b)}
	web := benchSidecar(b, m, benchService{id: "web-1", name: "web", protocol: "http", appPort: 1, upstream: "api"})
	var up, down []time.Duration
	for i := 0; b.Loop(); i++ {
		port := 30000 + i%1000
		id := fmt.Sprintf("bench-api-%d-sidecar-proxy", i)
		start := time.Now()
		err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			Kind: api.ServiceKindConnectProxy, ID: id, Name: "api-sidecar-proxy", Address: "127.0.0.2", Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", LocalServicePort: 1},
		})
		if err != nil {
			b.Fatal(err)
		}
		up = append(up, waitStat(b, web, port, true).Sub(start))
		start = time.Now()
		if err := m.consul.Client.Agent().ServiceDeregister(id); err != nil {
			b.Fatal(err)
		}
		down = append(down, waitStat(b, web, port, false).Sub(start))
	}
	if testing.Verbose() {
		b.Log(web.sidecar.Output())
	}
	for _, s := range []struct {
		name string
		d    []time.Duration
	}{{"add", up}, {"remove", down}} {
		sort.Slice(s.d, func(i, j int) bool { return s.d[i] < s.d[j] })
		b.ReportMetric(float64(s.d[len(s.d)/2].Microseconds())/1000, s.name+"-p50-ms")
		b.ReportMetric(float64(s.d[len(s.d)*99/100].Microseconds())/1000, s.name+"-p99-ms")
	}
}

// waitStat polls web's runtime API every 200us until the server on port is
// (or is no longer) in the pool, and returns when it saw it.
func waitStat(b *testing.B, in *instance, port int, present bool) time.Time {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if in.inPool(b, port) == present {
			return time.Now()
		}
		time.Sleep(200 * time.Microsecond)
	}
	b.Fatalf("server on port %d present=%v never seen", port, present)
	return time.Time{}
}
