package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
)

// benchApp is the cheapest possible app: HAProxy answering 200 itself, so
// that the proxies under test, not the app, use the CPU.
func benchApp(b testing.TB) int {
	port := harness.FreePort(b)
	dir := harness.TempDir(b)
	harness.StartHAProxy(b, dir, fmt.Sprintf(`global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend app
    bind 127.0.0.1:%d
    http-request return status 200 content-type text/plain string ok
`, port), fmt.Sprintf("127.0.0.1:%d", port))
	return port
}

// bareMTLS is the ceiling for any HAProxy data plane: mTLS termination with
// the same certificates and one thread, straight to the app, nothing else.
// It returns the address and HAProxy's pid.
func bareMTLS(b testing.TB, c *harness.Consul, appPort int) (string, int) {
	dir := harness.TempDir(b)
	leaf := c.IssueLeaf(b, "api")
	roots, _ := c.RootsPEM(b)
	harness.WriteFile(b, dir, "leaf.pem", leaf.CertPEM+leaf.KeyPEM)
	harness.WriteFile(b, dir, "roots.pem", roots)
	addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	h := harness.StartHAProxy(b, dir, fmt.Sprintf(`global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend bare
    bind %s ssl crt %s ca-file %s verify required
    default_backend app
backend app
    server app 127.0.0.1:%d
`, addr, filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem"), appPort), addr)
	return addr, h.Proc.Cmd.Process.Pid
}

// haproxyPids returns the master and worker pids of a sidecar's HAProxy.
func haproxyPids(b testing.TB, in *instance) []int {
	worker := workerPid(b, in.dir)
	return []int{parentOf(b, worker), worker}
}

type scenario struct {
	name string
	addr string
	pids []int // HAProxy processes under test, pinned alone to CPU 0
	// alsoCPU are processes whose CPU counts too but that stay with the
	// load generator (e.g. a sidecar whose embedded SPOA answers each
	// request).
	alsoCPU []int
	// load overrides the load's TLS, path and headers (Addr, Conns and
	// Duration are set by measure).
	load loadgen.Config
	rps  []float64
	cpu  []float64 // CPU microseconds per request of pids and alsoCPU
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// BenchmarkInboundPath compares haconnect's inbound path with bare HAProxy
// mTLS on keep-alive connections, in alternating rounds of one run:
//
//	bare       HAProxy mTLS straight to the app (the ceiling)
//	authz+tags the sidecar: SPOA authorization once per connection + tagging
//	full       the same plus telemetry (-admin-bind)
//
// Each HAProxy under test runs one thread pinned alone to CPU 0; the load
// generator, the app, the SPOA and Consul share CPU 1. It reports median
// req/s and HAProxy CPU per request, and the ratios to bare (target for
// full: >= 0.90 of bare req/s).
func BenchmarkInboundPath(b *testing.B) {
	m := &mesh{consul: harness.StartConsul(b)}
	m.consul.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
	appPort := benchApp(b)
	bareAddr, barePid := bareMTLS(b, m.consul, appPort)
	tags := benchRegister(b, m, "api-tags", appPort)
	full := benchRegister(b, m, "api-full", appPort, "-admin-bind", fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b)))
	scenarios := []*scenario{
		{name: "bare", addr: bareAddr, pids: []int{barePid}},
		{name: "authz+tags", addr: fmt.Sprintf("127.0.0.1:%d", tags.port), pids: haproxyPids(b, tags)},
		{name: "full", addr: fmt.Sprintf("127.0.0.1:%d", full.port), pids: haproxyPids(b, full)},
	}
	roots, _ := m.consul.RootsPEM(b)
	tlsCfg := harness.ClientTLS(m.consul.IssueLeaf(b, "web"), roots)
	for _, sc := range scenarios {
		sc.load.TLS = tlsCfg
	}
	measure(b, scenarios)
	reportRatios(b, scenarios, scenarios[0])
}

// measure loads each scenario in turn, in alternating rounds, with the
// HAProxy processes under test pinned alone to CPU 0 and everything else
// (this process, the app, the SPOA, Consul) on CPU 1.
func measure(b *testing.B, scenarios []*scenario) {
	for _, sc := range scenarios {
		pinDataPlane(b, sc.pids...)
	}
	defer pinTestProcess(b)()
	rounds, dur := 5, 3*time.Second
	if testing.Short() {
		rounds, dur = 1, time.Second
	}
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			for _, sc := range scenarios {
				cfg := sc.load
				cfg.Addr, cfg.Conns, cfg.Duration = sc.addr, 32, dur
				cpu := loadgen.StartCPU(append(append([]int(nil), sc.pids...), sc.alsoCPU...)...)
				res := loadgen.Run(context.Background(), cfg)
				var used time.Duration
				for _, u := range cpu.Stop() {
					used += u
				}
				if res.Errors > 0 || res.Requests == 0 {
					b.Fatalf("%s: %d errors, e.g. %s", sc.name, res.Errors, res.FirstError)
				}
				perReq := float64(used.Microseconds()) / float64(res.Requests)
				b.Logf("round %d %-10s %s, %.1fus CPU/request", r+1, sc.name, res, perReq)
				sc.rps, sc.cpu = append(sc.rps, res.RPS), append(sc.cpu, perReq)
			}
		}
	}
}

// reportRatios gives each scenario's median req/s and CPU per request, and their
// ratios to base's.
func reportRatios(b *testing.B, scenarios []*scenario, base *scenario) {
	for _, sc := range scenarios {
		b.ReportMetric(median(sc.rps), sc.name+"-req/s")
		b.ReportMetric(median(sc.cpu), sc.name+"-cpu-us/req")
		if sc != base {
			b.ReportMetric(median(sc.rps)/median(base.rps), sc.name+"/"+base.name+"-req/s")
			b.ReportMetric(median(base.cpu)/median(sc.cpu), sc.name+"/"+base.name+"-cpu")
		}
	}
}

// benchRegister registers an instance of api whose app listens on appPort
// and starts its sidecar with one HAProxy thread.
func benchRegister(b *testing.B, m *mesh, id string, appPort int, args ...string) *instance {
	return benchSidecar(b, m, benchService{id: id, name: "api", protocol: "http", appPort: appPort,
		args: append([]string{"-threads", "1"}, args...)})
}
