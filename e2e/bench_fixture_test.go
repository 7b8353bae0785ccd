// The benchmarks' shared fixture: the app and bare HAProxy baselines,
// registered sidecars and Consul's proxies, CPU pinning, and the
// measuring loop that reports every scenario against a baseline.

package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// benchApp is the cheapest possible app: HAProxy answering 200 itself, so
// that the proxies under test, not the app, use the CPU. It answers
// /16k with a body of 16 KiB and any other path with a body of 100 bytes
// (the benchmarks' two response sizes). It runs on CPU 1, the load side.
func benchApp(b testing.TB) int { return startBenchApp(b).port }

// benchAppServer is benchApp with its admin socket, through which it
// counts the requests it answered: every scenario ends at the app, so the
// count over a window of a run is that window's requests, whatever the
// generator reports for the whole run (connection set-up included).
type benchAppServer struct {
	port  int
	pid   int
	admin *haproxy.Admin
}

func startBenchApp(b testing.TB) *benchAppServer {
	port := harness.FreePort(b)
	dir := harness.TempDir(b)
	big := harness.WriteFile(b, dir, "16k.txt", strings.Repeat("0123456789abcdef", 1024))
	sock := filepath.Join(dir, "app.sock")
	h := harness.StartHAProxy(b, dir, fmt.Sprintf(`global
    nbthread 1
    stats socket %s mode 600 level admin
    # the 16 KiB answer is built whole in one buffer (twice the default
    # size: larger buffers cost the app more CPU per request)
    tune.bufsize 32768
defaults
    mode http
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend app
    bind 127.0.0.1:%d
    http-request return status 200 content-type text/plain file %s if { path /16k }
    http-request return status 200 content-type text/plain string %s
`, sock, port, big, strings.Repeat("x", smallBody)), fmt.Sprintf("127.0.0.1:%d", port))
	pinLoadSide(b, h.Proc.Cmd.Process.Pid)
	return &benchAppServer{port: port, pid: h.Proc.Cmd.Process.Pid, admin: haproxy.NewAdmin(sock)}
}

// requests is how many requests the app has answered so far.
func (a *benchAppServer) requests(b testing.TB) int64 {
	out, err := a.admin.Command("show info")
	if err != nil {
		b.Fatalf("the app's admin socket: %v", err)
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "CumReq: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	b.Fatalf("no CumReq in the app's show info:\n%s", out)
	return 0
}

// The app's two response bodies (benchApp).
const (
	smallBody = 100
	bigPath   = "/16k"
)

// runLoad runs one load: wrk (C, epoll) for keep-alive plain HTTP, where
// a Go client cost more CPU per request than the cheapest data planes and
// left their core partly idle; the Go client (a lean HTTP/1.1 reader) for
// mTLS with a client certificate, which wrk cannot present, and for a new
// connection per request.
func runLoad(ctx context.Context, cfg loadgen.Config) loadgen.Result {
	if cfg.TLS == nil && !cfg.NewConnPerRequest {
		return loadgen.RunWrk(ctx, loadgen.WrkConfig{Addr: cfg.Addr, Path: cfg.Path, Conns: cfg.Conns,
			Duration: cfg.Duration, Headers: cfg.Headers})
	}
	return loadgen.Run(ctx, cfg)
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

// bareTwoHops is the ceiling of any two-hop HTTP data plane here: two
// one-thread HAProxies in HTTP mode, the first taking plain HTTP and
// originating mTLS with a client leaf (keeping its connections, as a
// sidecar does), the second terminating mTLS in front of the app, and
// nothing else: no authorization, tagging, counting or identity check.
// It returns the first one's address and both HAProxies' pids.
func bareTwoHops(b testing.TB, c *harness.Consul, appPort int) (string, []int) {
	return bareTwoHopsWith(b, c, appPort, "http", true)
}

// bareTwoHopsWith is bareTwoHops in mode (http or tcp), with or without
// mTLS between the two HAProxies: the parts of the ceiling's cost.
func bareTwoHopsWith(b testing.TB, c *harness.Consul, appPort int, mode string, mTLS bool) (string, []int) {
	dir := harness.TempDir(b)
	apiLeaf, webLeaf := c.IssueLeaf(b, "api"), c.IssueLeaf(b, "web")
	roots, _ := c.RootsPEM(b)
	harness.WriteFile(b, dir, "api.pem", apiLeaf.CertPEM+apiLeaf.KeyPEM)
	harness.WriteFile(b, dir, "web.pem", webLeaf.CertPEM+webLeaf.KeyPEM)
	harness.WriteFile(b, dir, "roots.pem", roots)
	inner := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	outer := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	// The same TLS parameters as the sidecars' (the template's global
	// section): the ceiling measures what haconnect's features cost, not
	// a choice of protocol version or cipher.
	common := fmt.Sprintf(`global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.2
    ssl-default-bind-ciphers `+render.TLS12Ciphers+`
    ssl-default-server-ciphers `+render.TLS12Ciphers+`
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
defaults
    mode %s
    timeout connect 5s
    timeout client 1m
    timeout server 1m
`, mode)
	bindTLS, serverTLS := "", ""
	if mTLS {
		bindTLS = fmt.Sprintf(" ssl crt %s ca-file %s verify required", filepath.Join(dir, "api.pem"), filepath.Join(dir, "roots.pem"))
		serverTLS = fmt.Sprintf(" ssl crt %s ca-file %s verify required", filepath.Join(dir, "web.pem"), filepath.Join(dir, "roots.pem"))
	}
	hi := harness.StartHAProxy(b, harness.TempDir(b), common+fmt.Sprintf(`frontend inner
    bind %s%s
    default_backend app
backend app
    server app 127.0.0.1:%d
`, inner, bindTLS, appPort), inner)
	ho := harness.StartHAProxy(b, harness.TempDir(b), common+fmt.Sprintf(`frontend outer
    bind %s
    default_backend inner
backend inner
    server inner %s%s
`, outer, inner, serverTLS), outer)
	return outer, []int{ho.Proc.Cmd.Process.Pid, hi.Proc.Cmd.Process.Pid}
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
				res := runLoad(context.Background(), cfg)
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

// pinDataPlane pins the processes of a data plane under test to CPU 0.
func pinDataPlane(b testing.TB, pids ...int) {
	for _, pid := range pids {
		if err := loadgen.Pin(pid, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// pinLoadSide pins processes of the load side (the app, Consul, a
// TLS-originating HAProxy in front of the generator) to CPU 1, away from
// the data plane under test.
func pinLoadSide(b testing.TB, pids ...int) {
	for _, pid := range pids {
		if err := loadgen.Pin(pid, 1); err != nil {
			b.Fatal(err)
		}
	}
}

// pinTestProcess pins this process (the load generator) to CPU 1 with
// one P (GOMAXPROCS 1: on one CPU a second P only adds hand-offs between
// threads; the Go client spent about 5% less CPU per request) and returns
// the function that gives it every CPU back.
func pinTestProcess(b testing.TB) func() {
	if err := loadgen.Pin(os.Getpid(), 1); err != nil {
		b.Fatal(err)
	}
	procs := runtime.GOMAXPROCS(1)
	return func() {
		runtime.GOMAXPROCS(procs)
		all := make([]int, runtime.NumCPU())
		for i := range all {
			all[i] = i
		}
		_ = loadgen.Pin(os.Getpid(), all...)
	}
}

func medianRPS(rs []loadgen.Result) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = r.RPS
	}
	return median(v)
}

func medianP99(rs []loadgen.Result) time.Duration {
	s := make([]time.Duration, len(rs))
	for i, r := range rs {
		s[i] = r.P99
	}
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// benchService is a service instance a benchmark registers, with its
// haconnect sidecar.
type benchService struct {
	id, name string
	protocol string            // of the sidecar and of its upstream
	appPort  int               // the app's port (1 for a client without one)
	upstream string            // the destination of its upstream ("": none)
	args     []string          // extra sidecar flags, e.g. -threads 1
	meta     map[string]string // the service's Meta (what resolver subsets filter on)
	config   map[string]any    // more Proxy.Config keys
}

// benchSidecar registers s, starts its sidecar and waits until its public
// listener and its upstream's listen.
func benchSidecar(b *testing.B, m *mesh, s benchService) *instance {
	in := &instance{id: s.id, upstream: map[string]int{}, port: harness.FreePort(b), dir: harness.TempDir(b)}
	proxy := &api.AgentServiceConnectProxyConfig{Config: map[string]any{"protocol": s.protocol, "bind_address": "127.0.0.1"}}
	maps.Copy(proxy.Config, s.config)
	if s.upstream != "" {
		in.upstream[s.upstream] = harness.FreePort(b)
		proxy.Upstreams = []api.Upstream{{DestinationName: s.upstream, LocalBindPort: in.upstream[s.upstream],
			Config: map[string]any{"protocol": s.protocol}}}
	}
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: s.id, Name: s.name, Address: "127.0.0.1", Port: s.appPort, Meta: s.meta,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: in.port, Proxy: proxy,
			Checks: benchListeningCheck(in.port)}},
	})
	if err != nil {
		b.Fatal(err)
	}
	in.sidecar = harness.Start(b, "sidecar "+s.id, harness.Binary(b, "haconnect"), append([]string{"sidecar",
		"-sidecar-for", s.id, "-consul-addr", m.consul.Addr, "-dir", in.dir, "-stop-grace", "1s"}, s.args...)...)
	in.waitReady(b)
	return in
}

// benchRegisterWeb registers a client service whose sidecar has an HTTP
// upstream to dest, and starts its sidecar on one thread.
func benchRegisterWeb(b *testing.B, m *mesh, id, name, dest string) *instance {
	return benchSidecar(b, m, benchService{id: id, name: name, protocol: "http", appPort: 1, upstream: dest,
		args: []string{"-threads", "1"}})
}

type consulProxy struct {
	pid      int
	upstream int
}

// consulProxies runs Consul's built-in proxy for capi (in front of the app)
// and cweb (with capi as its upstream), the baseline every Consul user has.
func consulProxies(b *testing.B, m *mesh, appPort int) (capi, cweb consulProxy) {
	return consulProxyPair(b, m, "c", appPort, func(port int) bool {
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
}

// consulProxyPair runs Consul's built-in proxy for <prefix>api (in front
// of the app on appPort) and <prefix>web (with <prefix>api as its
// upstream), and waits until answers(the upstream's local port) is true.
func consulProxyPair(b *testing.B, m *mesh, prefix string, appPort int, answers func(port int) bool) (capi, cweb consulProxy) {
	apiName, webName := prefix+"api", prefix+"web"
	apiPort, webPort := harness.FreePort(b), harness.FreePort(b)
	cweb.upstream = harness.FreePort(b)
	for _, reg := range []*api.AgentServiceRegistration{
		{ID: apiName + "-1", Name: apiName, Address: "127.0.0.1", Port: appPort,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: apiPort,
				Proxy:  &api.AgentServiceConnectProxyConfig{Config: map[string]any{"bind_address": "127.0.0.1"}},
				Checks: benchListeningCheck(apiPort)}}},
		{ID: webName + "-1", Name: webName, Address: "127.0.0.1", Port: 1,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: webPort,
				Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"bind_address": "127.0.0.1"},
					Upstreams: []api.Upstream{{DestinationName: apiName, LocalBindPort: cweb.upstream}}},
				Checks: benchListeningCheck(webPort)}}},
	} {
		if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
			b.Fatal(err)
		}
	}
	bin := harness.ConsulBinary(b)
	pa := harness.Start(b, "consul proxy "+apiName, bin, "connect", "proxy", "-sidecar-for", apiName+"-1", "-http-addr", m.consul.Addr, "-log-level", "warn")
	pw := harness.Start(b, "consul proxy "+webName, bin, "connect", "proxy", "-sidecar-for", webName+"-1", "-http-addr", m.consul.Addr, "-log-level", "warn")
	harness.WaitListening(b, fmt.Sprintf("127.0.0.1:%d", apiPort), 20*time.Second)
	harness.WaitListening(b, fmt.Sprintf("127.0.0.1:%d", cweb.upstream), 20*time.Second)
	harness.WaitFor(b, 20*time.Second, webName+" -> "+apiName+" through the consul proxies", func() bool { return answers(cweb.upstream) })
	return consulProxy{pid: pa.Cmd.Process.Pid}, consulProxy{pid: pw.Cmd.Process.Pid, upstream: cweb.upstream}
}

// benchListeningCheck is listeningCheck with room for a saturated load
// side: the Consul agent shares CPU 1 with the generator and the app, and
// at 512 connections with 16 KiB answers it missed the 200 ms timeout,
// marked a sidecar critical and the callers lost their upstream (Consul's
// proxy: "no healthy instances found"). The benchmarks measure the data
// planes, not a health check starved of CPU.
func benchListeningCheck(port int) api.AgentServiceChecks {
	c := listeningCheck(port)
	c[0].Timeout, c[0].FailuresBeforeCritical = "2s", 5
	return c
}

// rss is a process's resident memory in bytes.
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb << 10
		}
	}
	return 0
}

// startRSSSampler samples the processes' RSS every 100ms until the
// returned function is called, which gives each one's peak.
func startRSSSampler(pids []int) func() []int64 {
	peak := make([]int64, len(pids))
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			for i, p := range pids {
				peak[i] = max(peak[i], rss(p))
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	return func() []int64 { close(stop); <-done; return peak }
}
