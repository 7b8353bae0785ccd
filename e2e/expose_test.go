package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/go-connections/nat"
	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/nomad"
)

// exposeApp is a service's app with a health endpoint, a metrics endpoint
// and something that must stay private; it records the paths it served.
type exposeApp struct {
	*httptest.Server
	port int
	mu   sync.Mutex
	seen []string
}

func newExposeApp(t *testing.T) *exposeApp {
	a := &exposeApp{}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.seen = append(a.seen, r.URL.Path)
		a.mu.Unlock()
		switch r.URL.Path {
		case "/health", "/metrics":
			fmt.Fprintf(w, "ok %s source=%q", r.URL.Path, r.Header.Get("X-Haconnect-Source"))
		default:
			fmt.Fprintf(w, "private %s", r.URL.Path)
		}
	}))
	t.Cleanup(a.Close)
	a.port = a.Listener.Addr().(*net.TCPAddr).Port
	return a
}

func (a *exposeApp) served(path string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Contains(a.seen, path)
}

// nomadExposeRegistrations are the registrations Nomad makes in Consul for
// group "api" of job "demo" with, on service "api" (port label "8080"):
//
//	check { type = "http"  path = "/health"  interval = "1s"  timeout = "1s"  expose = true }
//	connect { sidecar_service { proxy {
//	  expose { path { path = "/metrics"  protocol = "http"  local_path_port = <app>  listener_port = "metrics" } }
//	} } }
//
// Shaped as Nomad writes them (github.com/hashicorp/nomad, read at
// aa026cc99cfb, 2026-08-21):
//   - nomad/job_endpoint_hook_expose_check.go, jobExposeCheckHook.Mutate and
//     exposePathForCheck: at submission the exposed check becomes an expose
//     path {Path: check.Path, Protocol: check.Protocol (empty here),
//     LocalPathPort: the service's port, ListenerPort: the check's port
//     label, a generated dynamic port "svc_api_ck_<hash>" with To = -1, i.e.
//     the same number inside the namespace as on the host};
//   - command/agent/consul/connect.go, connectProxyExpose and
//     connectProxyExposePaths: the sidecar registers Proxy.Expose{Checks:
//     false, Paths: [{ListenerPort: the label's host port, Path,
//     LocalPathPort, Protocol, ParsedFromCheck: false}]}; connectProxyConfig:
//     Config bind_address "0.0.0.0" unless the job sets it, bind_port, and
//     envoy_stats_tags; connectSidecarRegistration: Address/Port are the host
//     IP and port of the sidecar's mapping, with the checks "Connect Sidecar
//     Aliasing <service ID>" and "Connect Sidecar Listening" (TCP, 10s);
//   - command/agent/consul/connect.go, newConnect: the sidecar is not a
//     service of its own but the service's Connect.SidecarService, so Consul
//     fills in the rest (agent/sidecar_service.go: ID "<service ID>-sidecar-
//     proxy", DestinationServiceName/ID, LocalServiceAddress 127.0.0.1 and
//     LocalServicePort = the service's port when not given);
//   - command/agent/consul/service_client.go, checkRegs and createCheckReg:
//     the check is registered on its own for the service, HTTP =
//     http://<host IP>:<host port of the check's port label>/health, i.e.
//     the exposed listener.
//
// Test-only difference: bind_address is 127.0.0.1 (the sidecar here runs on
// the host, not in a namespace, and the test listens on loopback only).
type nomadExposeRegs struct {
	service *consulapi.AgentServiceRegistration
	check   *consulapi.AgentCheckRegistration
}

func nomadExposeRegistrations(allocID string, app, proxyPort, checkPort, metricsPort int) nomadExposeRegs {
	svcID := nomad.ServiceID(allocID, "api", "api", "8080")
	return nomadExposeRegs{
		service: &consulapi.AgentServiceRegistration{ID: svcID, Name: "api", Address: "127.0.0.1", Port: app,
			Connect: &consulapi.AgentServiceConnect{SidecarService: &consulapi.AgentServiceRegistration{
				Address: "127.0.0.1", Port: proxyPort,
				Proxy: &consulapi.AgentServiceConnectProxyConfig{
					Mode: consulapi.ProxyModeDefault,
					Config: map[string]any{"bind_address": "127.0.0.1", "bind_port": proxyPort, "protocol": "http",
						"envoy_stats_tags": []string{"nomad.alloc_id=" + allocID, "nomad.group=api", "nomad.job=demo", "nomad.namespace=default"}},
					Expose: consulapi.ExposeConfig{Checks: false, Paths: []consulapi.ExposePath{
						{ListenerPort: checkPort, Path: "/health", LocalPathPort: app, Protocol: "", ParsedFromCheck: false},
						{ListenerPort: metricsPort, Path: "/metrics", LocalPathPort: app, Protocol: "http", ParsedFromCheck: false},
					}},
				},
				Checks: consulapi.AgentServiceChecks{
					{Name: "Connect Sidecar Aliasing " + svcID, AliasService: svcID},
					{Name: "Connect Sidecar Listening", TCP: fmt.Sprintf("127.0.0.1:%d", proxyPort), Interval: "10s"},
				},
			}}},
		check: &consulapi.AgentCheckRegistration{ID: "_nomad-check-exposed-health", Name: "api-health", ServiceID: svcID,
			AgentServiceCheck: consulapi.AgentServiceCheck{HTTP: fmt.Sprintf("http://127.0.0.1:%d/health", checkPort),
				Interval: "1s", Timeout: "1s"}},
	}
}

func (r nomadExposeRegs) register(t *testing.T, c *harness.Consul) {
	t.Helper()
	if err := c.Client.Agent().ServiceRegister(r.service); err != nil {
		t.Fatal(err)
	}
	if err := c.Client.Agent().CheckRegister(r.check); err != nil {
		t.Fatal(err)
	}
}

// TestExposedPathsAsNomadRegistersThem: a service whose HTTP check goes
// through an exposed path (what Nomad registers for `check { expose = true
// }`) goes passing in Consul through haconnect; the exposed listeners serve
// their paths and nothing else; the inbound still demands a client
// certificate.
func TestExposedPathsAsNomadRegistersThem(t *testing.T) {
	m := newMesh(t)
	app := newExposeApp(t)
	allocID := fmt.Sprintf("%08x-0000-4000-8000-000000000015", time.Now().UnixNano()&0xffffffff)
	proxyPort, checkPort, metricsPort := harness.FreePort(t), harness.FreePort(t), harness.FreePort(t)
	regs := nomadExposeRegistrations(allocID, app.port, proxyPort, checkPort, metricsPort)
	regs.register(t, m.consul)
	// Consul filled the sidecar in as it does for Nomad's registrations.
	if svc, _, err := m.consul.Client.Agent().Service(nomad.ProxyID(allocID, "api", "api", "8080"), nil); err != nil ||
		svc.Proxy.LocalServicePort != app.port || svc.Proxy.DestinationServiceID != regs.service.ID {
		t.Fatalf("the sidecar registration: %+v %v", svc, err)
	}
	// The check fails while nothing listens on the exposed port.
	harness.WaitFor(t, 10*time.Second, "the check critical before the sidecar", func() bool {
		return checkStatus(t, m.consul, "_nomad-check-exposed-health") == consulapi.HealthCritical
	})
	dir := harness.TempDir(t)
	sidecar := harness.Start(t, "sidecar api", harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-proxy-id", nomad.ProxyID(allocID, "api", "api", "8080"), "-dir", dir, "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, ""))...)
	harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", checkPort), 20*time.Second)

	took := harness.WaitFor(t, 15*time.Second, "the exposed check passing in Consul", func() bool {
		return checkStatus(t, m.consul, "_nomad-check-exposed-health") == consulapi.HealthPassing
	})
	t.Logf("check passing %s after the listener came up", took.Round(time.Millisecond))
	assertExposedOnly(t, app, checkPort, "/health")
	assertExposedOnly(t, app, metricsPort, "/metrics")

	t.Run("the inbound still requires a client certificate", func(t *testing.T) {
		roots, _ := m.consul.RootsPEM(t)
		url := fmt.Sprintf("https://127.0.0.1:%d/health", proxyPort)
		if code, body, err := getOnce(harness.ClientTLS(nil, roots), url, 3*time.Second); err == nil {
			t.Fatalf("inbound without a client certificate answered %d %q", code, body)
		}
		// Plain HTTP on the inbound is no way around it either.
		if code, _, err := getOnce(nil, fmt.Sprintf("http://127.0.0.1:%d/health", proxyPort), 3*time.Second); err == nil && code < 400 {
			t.Fatalf("plain HTTP on the inbound answered %d", code)
		}
		code, body, err := getOnce(harness.ClientTLS(m.consul.IssueLeaf(t, "web"), roots), url, 3*time.Second)
		if err != nil || code != 200 || body != `ok /health source="web"` {
			t.Fatalf("inbound with a mesh certificate: %d %q %v", code, body, err)
		}
	})
	if strings.Contains(sidecar.Output(), "setting=Proxy.Expose") {
		t.Errorf("an expose setting Nomad writes was refused:\n%s", sidecar.Output())
	}
}

// TestExposedChecksFollowTheAgent: with Proxy.Expose.Checks the Consul
// agent sends the service's HTTP check to the proxy's address on a port of
// its own choosing (21500 and up); haconnect learns it from the agent and
// the check goes passing. Only this test uses Consul's default expose
// range on this machine (harness.FreePort stays above 22000).
func TestExposedChecksFollowTheAgent(t *testing.T) {
	exposedChecksScenario(t, newMesh(t), "")
}

// TestSecureExposedChecks is the same with ACLs (default deny) and TLS, the
// sidecar holding only docs/acl/sidecar.hcl's rules for its service: the
// token cannot read /v1/agent/self (agent:read), so the agent's address is
// unknown, and the checks are still served (to loopback and the proxy's
// address, where the agent's calls come from on its host).
func TestSecureExposedChecks(t *testing.T) {
	m := &mesh{t: t, consul: harness.StartSecureConsul(t)}
	_, apiPolicy := sidecarPolicies(t)
	tok := m.consul.CreateToken(t, "sidecar-api", apiPolicy)
	out := exposedChecksScenario(t, m, tok.SecretID)
	if strings.Contains(out, tok.SecretID) {
		t.Error("the sidecar logged its token")
	}
}

// exposedChecksScenario registers api-1 with an HTTP check and a sidecar
// with Expose.Checks, runs `haconnect sidecar` with token, and checks that
// the check goes passing through the port the agent chose, that the port
// serves nothing else, and that a check added later follows. It returns
// the sidecar's output.
func exposedChecksScenario(t *testing.T, m *mesh, token string) string {
	app := newExposeApp(t)
	proxyPort := harness.FreePort(t)
	reg := &consulapi.AgentServiceRegistration{
		ID: "api-1", Name: "api", Address: "127.0.0.1", Port: app.port,
		Checks: consulapi.AgentServiceChecks{{CheckID: "api-health", HTTP: fmt.Sprintf("http://127.0.0.1:%d/health", app.port),
			Interval: "1s", Timeout: "1s"}},
		Connect: &consulapi.AgentServiceConnect{SidecarService: &consulapi.AgentServiceRegistration{
			Port: proxyPort, Address: "127.0.0.1",
			Proxy: &consulapi.AgentServiceConnectProxyConfig{
				Config: map[string]any{"protocol": "http", "bind_address": "127.0.0.1"},
				Expose: consulapi.ExposeConfig{Checks: true},
			},
			Checks: listeningCheck(proxyPort),
		}},
	}
	if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	checks, err := m.consul.Client.Agent().ChecksWithFilter(`CheckID == "api-health"`)
	if err != nil || checks["api-health"] == nil {
		t.Fatalf("check: %v", err)
	}
	exposed := checks["api-health"].ExposedPort
	if exposed == 0 {
		t.Fatal("the agent gave the check no exposed port")
	}
	dir := harness.TempDir(t)
	sidecar := harness.Start(t, "sidecar api-1", harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-sidecar-for", "api-1", "-dir", dir, "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, token))...)
	harness.WaitFor(t, 20*time.Second, "the exposed check passing in Consul through the proxy", func() bool {
		ch, err := m.consul.Client.Agent().ChecksWithFilter(`CheckID == "api-health"`)
		return err == nil && ch["api-health"] != nil && ch["api-health"].Status == consulapi.HealthPassing &&
			strings.Contains(ch["api-health"].Output, fmt.Sprintf("http://127.0.0.1:%d/health: 200", exposed))
	})
	assertExposedOnly(t, app, exposed, "/health")
	if !strings.Contains(sidecar.Output(), "Proxy.Expose.Checks: check") || !strings.Contains(sidecar.Output(), "state=exposed") {
		t.Errorf("the sidecar did not log the exposed check:\n%s", sidecar.Output())
	}

	// A check added later is exposed too, on its own port.
	if err := m.consul.Client.Agent().CheckRegister(&consulapi.AgentCheckRegistration{ID: "api-metrics", Name: "metrics",
		ServiceID: "api-1", AgentServiceCheck: consulapi.AgentServiceCheck{
			HTTP: fmt.Sprintf("http://127.0.0.1:%d/metrics", app.port), Interval: "1s", Timeout: "1s"}}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 20*time.Second, "the later check passing through the proxy", func() bool {
		return checkStatus(t, m.consul, "api-metrics") == consulapi.HealthPassing
	})
	return sidecar.Output()
}

func checkStatus(t *testing.T, c *harness.Consul, id string) string {
	t.Helper()
	checks, err := c.Client.Agent().ChecksWithFilter(fmt.Sprintf("CheckID == %q", id))
	if err != nil {
		t.Fatal(err)
	}
	if ch := checks[id]; ch != nil {
		return ch.Status
	}
	return ""
}

// assertExposedOnly checks that the plain listener on port serves path and
// answers 404 to every other path, which the app never sees.
func assertExposedOnly(t *testing.T, app *exposeApp, port int, path string) {
	t.Helper()
	get := func(p string, hdr ...string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", port, p), nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := (&http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
		if err != nil {
			t.Fatalf("GET :%d%s: %v", port, p, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(path, "X-Haconnect-Source", "admin"); code != 200 || body != fmt.Sprintf("ok %s source=\"\"", path) {
		t.Errorf("exposed %s on %d: %d %q, want 200 from the app without a caller-set identity", path, port, code, body)
	}
	for _, other := range []string{"/", "/admin", path + "/x", "/%2e" + path, "/" + path} {
		if code, body := get(other); code != 404 || !strings.Contains(body, "haconnect: not an exposed path") {
			t.Errorf("GET :%d%s: %d %q, want haconnect's 404", port, other, code, body)
		}
	}
	for _, p := range []string{"/admin", path + "/x"} {
		if app.served(p) {
			t.Errorf("the app served %s through the exposed listener on %d", p, port)
		}
	}
}

// exposeAlloc is connectAlloc as the fake Nomad serves it after Nomad's
// job mutation for `check { type = "http" path = "/health" expose = true }`
// on service api (nomad/job_endpoint_hook_expose_check.go,
// exposePathForCheck): the check gets a generated port label
// "svc_<service>_ck_<6 hex of the check's hash>", added to the group's
// dynamic ports with To = -1, and the sidecar's proxy an expose path with
// that label as ListenerPort and the service's port as LocalPathPort. The
// allocation maps the label to checkPort (To = -1: the same number inside
// the namespace).
func exposeAlloc(id string, checkPort int) *nomadapi.Allocation {
	const label = "svc_api_ck_3c9f1a"
	a := connectAlloc(id)
	tg := a.Job.TaskGroups[0]
	tg.Networks[0].DynamicPorts = append(tg.Networks[0].DynamicPorts, nomadapi.Port{Label: label, To: -1, HostNetwork: "default"})
	svc := tg.Services[0]
	svc.Checks = []nomadapi.ServiceCheck{{Name: "api-health", Type: "http", Path: "/health", Expose: true, PortLabel: label,
		Interval: time.Second, Timeout: time.Second}}
	svc.Connect.SidecarService.Proxy = &nomadapi.ConsulProxy{Expose: &nomadapi.ConsulExposeConfig{Paths: []*nomadapi.ConsulExposePath{
		{Path: "/health", LocalPathPort: 8080, ListenerPort: label}}}}
	a.AllocatedResources = &nomadapi.AllocatedResources{Shared: nomadapi.AllocatedSharedResources{
		Ports: []nomadapi.PortMapping{{Label: label, Value: checkPort, To: checkPort, HostIP: "127.0.0.1"}}}}
	return a
}

// TestNomadHookExposedCheck runs the Nomad path end to end: the fake Nomad
// serves the allocation of a job with `check { expose = true }`, Consul has
// the registrations Nomad makes for it (nomadExposeRegistrations, with
// Nomad's bind_address 0.0.0.0 inside the namespace), and `haconnect
// nomad-hook` runs HAProxy in a container in the allocation's network
// namespace: the Consul agent's check through the published port goes
// passing, and that port serves nothing but /health.
func TestNomadHookExposedCheck(t *testing.T) {
	cli := harness.Docker(t)
	harness.Images(t)
	c := harness.StartConsul(t)
	fn := newFakeNomad(t)
	ctx := context.Background()
	a := &allocation{id: fmt.Sprintf("%08x-0000-4000-8000-%012x", time.Now().UnixNano()&0xffffffff, os.Getpid()+15),
		hostPort: harness.FreePort(t), hookDir: harness.TempDir(t)}
	checkPort := harness.FreePort(t)
	harness.RemoveContainers(t, cli, "nomad_init_"+a.id, "app-"+a.id, "haconnect-"+a.id+"-api")
	pause, err := cli.ContainerCreate(ctx, &container.Config{
		Image: "haconnect/haproxy:latest", Entrypoint: []string{"sleep", "infinity"},
		Labels:       map[string]string{"com.hashicorp.nomad.alloc_id": a.id},
		ExposedPorts: nat.PortSet{"21000/tcp": {}, nat.Port(fmt.Sprintf("%d/tcp", checkPort)): {}},
	}, &container.HostConfig{PortBindings: nat.PortMap{
		"21000/tcp": {{HostIP: "127.0.0.1", HostPort: fmt.Sprint(a.hostPort)}},
		nat.Port(fmt.Sprintf("%d/tcp", checkPort)): {{HostIP: "127.0.0.1", HostPort: fmt.Sprint(checkPort)}},
	}}, nil, nil, "nomad_init_"+a.id)
	if err != nil {
		t.Fatal(err)
	}
	a.pause = pause.ID
	if err := cli.ContainerStart(ctx, pause.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	appDir := harness.TempDir(t)
	harness.WriteFile(t, appDir, "app.cfg", "defaults\n    mode http\n    timeout client 10s\nfrontend app\n    bind 127.0.0.1:8080\n"+
		"    http-request return status 200 content-type text/plain lf-string \"app %[path] source=%[req.hdr(x-haconnect-source)]\"\n")
	app, err := cli.ContainerCreate(ctx, &container.Config{Image: "haconnect/haproxy:latest", Cmd: []string{"-f", appDir + "/app.cfg"}},
		&container.HostConfig{NetworkMode: container.NetworkMode("container:" + pause.ID), Binds: []string{appDir + ":" + appDir}},
		nil, nil, "app-"+a.id)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.ContainerStart(ctx, app.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	// Nomad's registrations, with the sidecar binding 0.0.0.0:21000 inside
	// the namespace and the exposed check on checkPort (To = -1).
	regs := nomadExposeRegistrations(a.id, 8080, a.hostPort, checkPort, harness.FreePort(t))
	sidecar := regs.service.Connect.SidecarService
	sidecar.Proxy.Config["bind_address"], sidecar.Proxy.Config["bind_port"] = "0.0.0.0", 21000
	sidecar.Proxy.Expose.Paths = sidecar.Proxy.Expose.Paths[:1] // the check's path only: one port published here
	regs.register(t, c)
	fn.set(a.id, exposeAlloc(a.id, checkPort))
	a.hookEnv = append(hookEnv(a.id, fn.URL), "CONSUL_HTTP_ADDR="+c.Addr)
	a.startHook(t)

	harness.WaitFor(t, 60*time.Second, "the exposed check passing through the HAProxy container", func() bool {
		return checkStatus(t, c, "_nomad-check-exposed-health") == consulapi.HealthPassing
	})
	get := func(path string) (int, string) {
		code, body, err := getOnce(nil, fmt.Sprintf("http://127.0.0.1:%d%s", checkPort, path), 3*time.Second)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return code, body
	}
	if code, body := get("/health"); code != 200 || body != "app /health source=" {
		t.Fatalf("exposed /health: %d %q", code, body)
	}
	if code, body := get("/admin"); code != 404 || !strings.Contains(body, "haconnect: not an exposed path") {
		t.Fatalf("exposed port, /admin: %d %q, want haconnect's 404", code, body)
	}
	roots, _ := c.RootsPEM(t)
	if code, body, err := getOnce(harness.ClientTLS(nil, roots), fmt.Sprintf("https://127.0.0.1:%d/health", a.hostPort), 3*time.Second); err == nil {
		t.Fatalf("the inbound answered a caller without a certificate: %d %q", code, body)
	}
}
