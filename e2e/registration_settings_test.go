// Proxy and upstream settings written for Envoy, served by haconnect
// through real Consul and HAProxy: the metrics listener of
// envoy_prometheus_bind_addr, upstream limits, the passive health check,
// and refused envoy_* keys logged once by name.

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestMetricsOnEnvoyPrometheusBindAddr registers web with
// envoy_prometheus_bind_addr and an unknown envoy_* key, and runs its
// sidecar without -admin-bind: /metrics must be served there (haconnect's
// and HAProxy's metrics). The registration then moves the address and adds
// envoy_stats_bind_addr: the next render serves /metrics at the new
// address and /stats at the second one, the old address no longer answers,
// and the unknown key has been logged once by name.
func TestMetricsOnEnvoyPrometheusBindAddr(t *testing.T) {
	m := newMesh(t)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "web") }))
	t.Cleanup(app.Close)
	web := &instance{id: "web-1", port: harness.FreePort(t), dir: harness.TempDir(t)}
	prom1, prom2, stats := harness.FreePort(t), harness.FreePort(t), harness.FreePort(t)
	register := func(cfg map[string]any) {
		t.Helper()
		cfg["protocol"], cfg["bind_address"] = "http", "127.0.0.1"
		cfg["envoy_made_up_setting"] = `{"cluster":"x"}`
		reg := &api.AgentServiceRegistration{
			ID: web.id, Name: "web", Address: "127.0.0.1", Port: app.Listener.Addr().(*net.TCPAddr).Port,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: web.port, Proxy: &api.AgentServiceConnectProxyConfig{Config: cfg}, Checks: listeningCheck(web.port),
			}},
		}
		if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
			t.Fatalf("register web: %v", err)
		}
	}
	register(map[string]any{"envoy_prometheus_bind_addr": fmt.Sprintf("127.0.0.1:%d", prom1)})
	web.sidecar = harness.Start(t, "sidecar web-1", harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-sidecar-for", web.id, "-dir", web.dir, "-ttl", "300ms", "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, ""))...)

	get := func(addr string) (int, string) {
		c := &http.Client{Timeout: 3 * time.Second}
		resp, err := c.Get("http://" + addr)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	metricsAt := func(port int) bool {
		code, body := get(fmt.Sprintf("127.0.0.1:%d/metrics", port))
		return code == 200 && strings.Contains(body, "haproxy_frontend_") && strings.Contains(body, "haconnect_")
	}
	harness.WaitFor(t, 30*time.Second, "/metrics on envoy_prometheus_bind_addr", func() bool { return metricsAt(prom1) })

	register(map[string]any{"envoy_prometheus_bind_addr": fmt.Sprintf("127.0.0.1:%d", prom2),
		"envoy_stats_bind_addr": fmt.Sprintf("127.0.0.1:%d", stats)})
	harness.WaitFor(t, 30*time.Second, "/metrics on the new envoy_prometheus_bind_addr", func() bool { return metricsAt(prom2) })
	if code, body := get(fmt.Sprintf("127.0.0.1:%d/stats", stats)); code != 200 || !strings.Contains(body, "public_listener") {
		t.Errorf("/stats on envoy_stats_bind_addr: %d %.200s", code, body)
	}
	harness.WaitFor(t, 10*time.Second, "the old address closed", func() bool {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", prom1), time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	if n := strings.Count(web.sidecar.Output(), "registration setting refused (not supported): Proxy.Config.envoy_made_up_setting"); n != 1 {
		t.Errorf("the unknown envoy_* key was logged %d times, want once", n)
	}
}

// slowApp answers after delay, counting requests in flight and the most
// seen at once.
type slowApp struct {
	*httptest.Server
	mu            sync.Mutex
	inFlight, max int
}

func startSlowApp(t *testing.T, delay time.Duration) *slowApp {
	a := &slowApp{}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.inFlight++
		a.max = max(a.max, a.inFlight)
		a.mu.Unlock()
		time.Sleep(delay)
		a.mu.Lock()
		a.inFlight--
		a.mu.Unlock()
		fmt.Fprint(w, "slow")
	}))
	t.Cleanup(a.Close)
	return a
}

func (a *slowApp) port() int { return a.Listener.Addr().(*net.TCPAddr).Port }

// TestUpstreamLimitsHold gives web's upstream api limits of 2 concurrent
// requests and 1 pending, with connect_timeout_ms 1000, in front of an app
// that answers in 3s. Two requests go through; the third queues and gets
// a 503 when the queue timeout (the connect timeout) ends; a fourth, sent
// while the third waits, is refused at once (the pending limit); the app
// never sees more than 2 at once.
func TestUpstreamLimitsHold(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	slow := startSlowApp(t, 3*time.Second)
	m.register(&instance{id: "api-1"}, "api", "http", slow.port())
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web", api.Upstream{DestinationName: "api", Config: map[string]any{
		"protocol": "http", "connect_timeout_ms": 1000,
		"limits": map[string]any{"max_concurrent_requests": 2, "max_pending_requests": 1},
	}})
	harness.WaitFor(t, 30*time.Second, "web reaching api", func() bool {
		code, _, err := web.call("api")
		return err == nil && code == http.StatusOK
	})

	type result struct {
		code int
		body string
		took time.Duration
	}
	call := func() result {
		start := time.Now()
		code, body, err := web.call("api")
		if err != nil {
			body = err.Error()
		}
		return result{code, body, time.Since(start)}
	}
	results := make([]result, 4)
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); results[i] = call() }()
	}
	harness.WaitFor(t, 5*time.Second, "two requests at the app", func() bool {
		slow.mu.Lock()
		defer slow.mu.Unlock()
		return slow.inFlight == 2
	})
	wg.Add(1)
	go func() { defer wg.Done(); results[2] = call() }()
	harness.WaitFor(t, 2*time.Second, "the third request queued", func() bool {
		return strings.Contains(web.admin(t, "show stat upstream_api 2 -1"), "upstream_api,BACKEND,1,") // qcur
	})
	results[3] = call()
	wg.Wait()

	for i := 0; i < 2; i++ {
		if results[i].code != 200 {
			t.Errorf("request %d within the limit: %+v", i+1, results[i])
		}
	}
	if r := results[2]; r.code != 503 || r.took < 900*time.Millisecond || r.took > 2500*time.Millisecond {
		t.Errorf("the queued request: %+v, want a 503 after the 1s queue timeout", r)
	}
	if r := results[3]; r.code != 503 || !strings.Contains(r.body, "max_pending_requests") || r.took > 500*time.Millisecond {
		t.Errorf("the request past the pending limit: %+v, want an immediate 503 naming max_pending_requests", r)
	}
	if slow.max > 2 {
		t.Errorf("the app saw %d requests at once, the limit is 2", slow.max)
	}
	t.Logf("within the limit: %v %v; queued: %v; past the pending limit: %v", results[0].took, results[1].took, results[2].took, results[3].took)
}

// TestPassiveHealthCheckTakesAFailingInstanceOut runs api-1 (healthy) and
// api-2 (its app answers 500 to everything; Consul still sees it healthy).
// web's upstream api has passive_health_check max_failures 2: under load
// of GET requests no request fails (each 500 is retried on api-1), and
// api-2 is marked down in web's HAProxy and stays down (base_ejection_time
// 30s), though its health checks pass.
func TestPassiveHealthCheckTakesAFailingInstanceOut(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	m.add("api", "api-1")
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "api-2 broken", http.StatusInternalServerError)
	}))
	t.Cleanup(failing.Close)
	api2 := m.register(&instance{id: "api-2"}, "api", "http", failing.Listener.Addr().(*net.TCPAddr).Port)
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web", api.Upstream{DestinationName: "api", Config: map[string]any{
		"protocol": "http", "passive_health_check": map[string]any{"max_failures": 2, "interval": "10s", "base_ejection_time": "30s"},
	}})
	harness.WaitFor(t, 30*time.Second, "both api instances in web's pool", func() bool {
		return web.inPool(t, api2.port) && web.inPool(t, m.consulPort(t, "api-1"))
	})

	l := startLoad(web, "api", 4)
	time.Sleep(3 * time.Second)
	l.finish()
	l.check(t, "GET load while api-2 answers 500")
	// "DOWN", or "DOWN 3/30" while its checks pass on the way back.
	down := func() bool {
		return strings.HasPrefix(serverStatus(web.admin(t, "show stat upstream_api 4 -1"), api2.port), "DOWN")
	}
	if !down() {
		t.Fatalf("api-2 is not marked down: %q", serverStatus(web.admin(t, "show stat upstream_api 4 -1"), api2.port))
	}
	// Its health checks pass (the sidecar answers TLS), yet it stays out:
	// rise is the ejection time.
	time.Sleep(4 * time.Second)
	if !down() {
		t.Fatal("api-2 came back within seconds: the ejection did not hold")
	}
	if l.byBody["api-2"] != 0 {
		t.Errorf("api-2 answered %d requests successfully", l.byBody["api-2"])
	}
}

// serverStatus is the status (UP, DOWN, MAINT, ...) of the server at port
// in a `show stat` answer.
func serverStatus(stat string, port int) string {
	for _, line := range strings.Split(stat, "\n") {
		f := strings.Split(line, ",")
		if len(f) > 73 && strings.HasSuffix(f[73], fmt.Sprintf(":%d", port)) {
			return f[17]
		}
	}
	return ""
}

// consulPort is the public port of the sidecar registered for service ID
// id.
func (m *mesh) consulPort(t *testing.T, id string) int {
	t.Helper()
	svc, _, err := m.consul.Client.Agent().Service(id+"-sidecar-proxy", nil)
	if err != nil {
		t.Fatal(err)
	}
	return svc.Port
}

// TestInboundTimeoutsReachHAProxy registers api with
// local_request_timeout_ms 1000 in front of an app that answers in 3s,
// handshake_timeout_ms 500 and max_inbound_connections 2: web's call gets
// the 504 of api's sidecar after about a second; a caller that connects to
// api's public port and never starts its TLS handshake is closed after
// about half a second (the default would wait a minute); the listener's
// maxconn is 2.
func TestInboundTimeoutsReachHAProxy(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	slow := startSlowApp(t, 3*time.Second)
	api1 := m.register(&instance{id: "api-1", config: map[string]any{
		"local_request_timeout_ms": 1000, "handshake_timeout_ms": 500, "max_inbound_connections": 2,
	}}, "api", "http", slow.port())
	web := m.add("web", "web-1", "api")

	harness.WaitFor(t, 30*time.Second, "web reaching api's sidecar", func() bool {
		code, _, err := web.call("api")
		return err == nil && code == http.StatusGatewayTimeout
	})
	start := time.Now()
	code, body, err := web.call("api")
	if took := time.Since(start); err != nil || code != http.StatusGatewayTimeout || took < 900*time.Millisecond || took > 2500*time.Millisecond {
		t.Errorf("call past local_request_timeout_ms: %d %q %v after %v, want 504 after about 1s", code, body, err, took)
	}

	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", api1.port), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start = time.Now()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if took := time.Since(start); err == nil || took < 400*time.Millisecond || took > 2*time.Second {
		t.Errorf("a silent caller was closed after %v (%v), want about 500ms (handshake_timeout_ms)", took, err)
	}

	info := api1.admin(t, "show stat public_listener 1 -1")
	if !strings.Contains(info, "public_listener,FRONTEND,") {
		t.Fatalf("no public_listener row: %s", info)
	}
	if slim := statField(t, info, "slim"); slim != "2" {
		t.Errorf("public_listener's session limit %q, want 2 (max_inbound_connections)", slim)
	}
}

// statField is the named column of the first row of a `show stat` answer.
func statField(t *testing.T, stat, name string) string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(stat), "\n")
	if len(lines) < 2 {
		t.Fatalf("show stat: %q", stat)
	}
	head := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	row := strings.Split(lines[1], ",")
	for i, h := range head {
		if h == name && i < len(row) {
			return row[i]
		}
	}
	t.Fatalf("show stat: no %s column", name)
	return ""
}

// TestLimitSharesFollowInstances gives web's upstream api max_connections
// 4 over two instances: each slot's maxconn is 2. When api-2 leaves, api-1
// gets the whole 4 through the runtime API, without a reload.
func TestLimitSharesFollowInstances(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	api1 := m.add("api", "api-1")
	api2 := m.add("api", "api-2")
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web", api.Upstream{DestinationName: "api", Config: map[string]any{
		"protocol": "http", "limits": map[string]any{"max_connections": 4},
	}})
	slim := func(port int) string {
		for _, line := range strings.Split(web.admin(t, "show stat upstream_api 4 -1"), "\n") {
			if f := strings.Split(line, ","); len(f) > 73 && strings.HasSuffix(f[73], fmt.Sprintf(":%d", port)) {
				return f[6] // slim: the server's maxconn
			}
		}
		return ""
	}
	harness.WaitFor(t, 30*time.Second, "both api instances with a share of 2", func() bool {
		return web.inPool(t, api1.port) && web.inPool(t, api2.port) && slim(api1.port) == "2" && slim(api2.port) == "2"
	})
	reloads := strings.Count(web.sidecar.Output(), "reload_reason=")
	if err := m.consul.Client.Agent().ServiceDeregister("api-2"); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 30*time.Second, "api-1 with the whole limit", func() bool {
		return !web.inPool(t, api2.port) && slim(api1.port) == "4"
	})
	if n := strings.Count(web.sidecar.Output(), "reload_reason="); n != reloads {
		t.Errorf("%d reloads to move the shares, want none (runtime API)", n-reloads)
	}
	if code, _, err := web.call("api"); err != nil || code != http.StatusOK {
		t.Fatalf("web to api-1: %d %v", code, err)
	}
}

// TestTCPStreamOutlivesTheHandshakeTimeout registers a TCP echo service
// with handshake_timeout_ms 300 and local_idle_timeout_ms 1500: the
// handshake bound (HAProxy 2.6's timeout client) must not cut an
// established stream that is quiet for a second, while a stream quiet
// longer than the idle timeout is closed.
func TestTCPStreamOutlivesTheHandshakeTimeout(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "echo", harness.Source("web", allow))
	m.register(&instance{id: "echo-1", config: map[string]any{"handshake_timeout_ms": 300, "local_idle_timeout_ms": 1500}},
		"echo", "tcp", startEcho(t))
	web := m.add("web", "web-1", "echo:tcp")
	harness.WaitFor(t, 20*time.Second, "echo through the mesh", func() bool {
		got, err := web.echo("echo", "ping")
		return err == nil && got == "ping"
	})
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", web.upstream["echo"]), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip := func(line string) error {
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, line+"\n"); err != nil {
			return err
		}
		buf := make([]byte, len(line)+1)
		_, err := io.ReadFull(c, buf)
		return err
	}
	if err := roundTrip("one"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // quiet: past the handshake timeout, within the idle one
	if err := roundTrip("two"); err != nil {
		t.Fatalf("a stream quiet for 1s was cut (handshake_timeout_ms must only bound the handshake): %v", err)
	}
	time.Sleep(2500 * time.Millisecond) // quiet past local_idle_timeout_ms
	if err := roundTrip("three"); err == nil {
		t.Fatal("a stream quiet past local_idle_timeout_ms was still open")
	}
}

// TestPassiveHealthCheckEjectsAtMostMaxEjectionPercent runs api-1 healthy
// and api-2, api-3 answering 500, with Envoy's default
// max_ejection_percent (10%, at least one instance): under load exactly
// one of the failing instances is taken out, and the other one is logged
// as spared.
func TestPassiveHealthCheckEjectsAtMostMaxEjectionPercent(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	api1 := m.add("api", "api-1")
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "broken", http.StatusInternalServerError)
	}))
	t.Cleanup(failing.Close)
	port := failing.Listener.Addr().(*net.TCPAddr).Port
	api2 := m.register(&instance{id: "api-2"}, "api", "http", port)
	api3 := m.register(&instance{id: "api-3"}, "api", "http", port)
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web", api.Upstream{DestinationName: "api", Config: map[string]any{
		"protocol": "http", "passive_health_check": map[string]any{"max_failures": 2},
	}})
	harness.WaitFor(t, 30*time.Second, "three api instances in web's pool", func() bool {
		return web.inPool(t, api1.port) && web.inPool(t, api2.port) && web.inPool(t, api3.port)
	})
	l := startLoad(web, "api", 4)
	time.Sleep(3 * time.Second)
	l.finish()
	t.Logf("load: %d ok, %d failed (retries may land on the spared instance)", l.ok.Load(), l.failed.Load())
	stat := web.admin(t, "show stat upstream_api 4 -1")
	s2, s3 := serverStatus(stat, api2.port), serverStatus(stat, api3.port)
	if strings.HasPrefix(s2, "DOWN") == strings.HasPrefix(s3, "DOWN") {
		t.Fatalf("api-2 %q, api-3 %q: want exactly one taken out", s2, s3)
	}
	if !strings.Contains(web.sidecar.Output(), "failing but not taken out: max_ejection_percent") {
		t.Error("the spared instance was not logged")
	}
}
