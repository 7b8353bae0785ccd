package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// mesh is a Consul agent with services registered the way Consul users do
// (a service with a sidecar_service), each proxy run by `haconnect sidecar`.
type mesh struct {
	t      *testing.T
	consul *harness.Consul
}

// instance is one registered service instance with its app and sidecar.
type instance struct {
	id       string
	args     []string // extra sidecar flags
	env      []string // extra sidecar environment
	app      *httptest.Server
	port     int // sidecar's public port
	dir      string
	sidecar  *harness.Process
	upstream map[string]int // destination -> local port
}

func newMesh(t *testing.T) *mesh {
	return &mesh{t: t, consul: harness.StartConsul(t)}
}

// add registers an instance of service with an HTTP app and starts its
// sidecar. upstreams lists destination services ("name", or "name:tcp" for
// a TCP upstream).
func (m *mesh) add(service, id string, upstreams ...string) *instance {
	m.t.Helper()
	return m.addInstance(&instance{id: id}, service, upstreams...)
}

// addInstance is add for an instance given its extra sidecar flags and
// environment (args, env).
func (m *mesh) addInstance(in *instance, service string, upstreams ...string) *instance {
	t := m.t
	t.Helper()
	id := in.id
	in.app = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s source=%s", id, r.Header.Get("X-Haconnect-Source"))
	}))
	t.Cleanup(in.app.Close)
	return m.register(in, service, "http", in.app.Listener.Addr().(*net.TCPAddr).Port, upstreams...)
}

// register registers in (whose app listens on appPort) and starts its
// sidecar.
func (m *mesh) register(in *instance, service, protocol string, appPort int, upstreams ...string) *instance {
	t := m.t
	t.Helper()
	id := in.id
	in.port, in.dir = harness.FreePort(t), harness.TempDir(t)
	if in.upstream == nil {
		in.upstream = map[string]int{}
	}
	var ups []api.Upstream
	for _, u := range upstreams {
		name, proto, _ := strings.Cut(u, ":")
		if proto == "" {
			proto = "http"
		}
		in.upstream[name] = harness.FreePort(t)
		ups = append(ups, api.Upstream{DestinationName: name, LocalBindPort: in.upstream[name],
			Config: map[string]any{"protocol": proto}})
	}
	reg := &api.AgentServiceRegistration{
		ID: id, Name: service, Address: "127.0.0.1", Port: appPort,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: in.port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				Config:    map[string]any{"protocol": protocol, "bind_address": "127.0.0.1"},
				Upstreams: ups,
			},
			Checks: listeningCheck(in.port),
		}},
	}
	if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	in.sidecar = harness.StartEnv(t, "sidecar "+id, in.env, harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-sidecar-for", id, "-dir", in.dir, "-ttl", "300ms", "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, ""), in.args)...)
	in.waitReady(t)
	return in
}

// waitReady waits until in's HAProxy listens on its public and upstream
// ports and answers on its admin socket. HAProxy's master binds the TCP
// ports a moment before the admin socket exists, so the ports alone do not
// say that the socket is there.
func (in *instance) waitReady(t testing.TB) {
	t.Helper()
	harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", in.port), 20*time.Second)
	for _, p := range in.upstream {
		harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", p), 20*time.Second)
	}
	harness.WaitFor(t, 20*time.Second, in.id+"'s admin socket", func() bool {
		_, err := haproxy.NewAdmin(filepath.Join(in.dir, "admin.sock")).Command("show info")
		return err == nil
	})
}

// call makes one request from in's app to destination through the sidecar.
func (in *instance) call(dest string) (int, string, error) { return in.callPath(dest, "/") }

func (in *instance) callPath(dest, path string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", in.upstream[dest], path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// admin asks in's HAProxy a runtime API question.
func (in *instance) admin(t testing.TB, cmd string) string {
	t.Helper()
	out, err := haproxy.NewAdmin(filepath.Join(in.dir, "admin.sock")).Command(cmd)
	if err != nil {
		t.Fatalf("admin socket: %v", err)
	}
	return out
}

// inPool reports whether in's HAProxy has an active server on port in its
// upstream api.
func (in *instance) inPool(t testing.TB, port int) bool {
	t.Helper()
	return serverActive(in.admin(t, "show stat upstream_api 4 -1"), port)
}

// load calls dest from in with workers keep-alive clients until stop is
// closed, counting outcomes by instance and failures.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	byBody     map[string]int
	errs       []string
	wg         sync.WaitGroup
	stop       chan struct{}
}

func startLoad(in *instance, dest string, workers int) *load {
	l := &load{byBody: map[string]int{}, stop: make(chan struct{})}
	for i := 0; i < workers; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			c := &http.Client{Timeout: 5 * time.Second}
			url := fmt.Sprintf("http://127.0.0.1:%d/", in.upstream[dest])
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				resp, err := c.Get(url)
				if err != nil {
					l.fail(err.Error())
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					l.fail(fmt.Sprintf("%d %s", resp.StatusCode, b))
					continue
				}
				l.ok.Add(1)
				id, _, _ := strings.Cut(string(b), " ")
				l.mu.Lock()
				l.byBody[id]++
				l.mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *load) fail(msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	if len(l.errs) < 5 {
		l.errs = append(l.errs, msg)
	}
	l.mu.Unlock()
}

func (l *load) finish() { close(l.stop); l.wg.Wait() }

func (l *load) check(t *testing.T, what string) {
	t.Helper()
	t.Logf("%s: %d requests ok, %d failed, by instance %v", what, l.ok.Load(), l.failed.Load(), l.byBody)
	if l.failed.Load() > 0 {
		t.Fatalf("%s: %d requests failed, e.g. %v", what, l.failed.Load(), l.errs)
	}
	if l.ok.Load() == 0 {
		t.Fatalf("%s: no request succeeded", what)
	}
}

func TestSidecarMesh(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	api1 := m.add("api", "api-1")
	web := m.add("web", "web-1", "api")

	t.Run("web reaches api through both sidecars", func(t *testing.T) {
		harness.WaitFor(t, 10*time.Second, "web -> api 200", func() bool {
			code, body, err := web.call("api")
			return err == nil && code == 200 && body == "api-1 source=web"
		})
	})

	t.Run("deny refuses, allow restores", func(t *testing.T) {
		m.consul.SetIntentions(t, "api", harness.Source("web", deny))
		harness.WaitFor(t, 5*time.Second, "web -> api denied", func() bool {
			code, body, _ := web.call("api")
			return code == 403 && strings.Contains(body, "intention_deny")
		})
		m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "web -> api allowed again", func() bool {
			code, _, _ := web.call("api")
			return code == 200
		})
	})

	t.Run("HTTP permissions are checked per request", func(t *testing.T) {
		m.consul.SetProtocol(t, "api", "http")
		m.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			{Action: deny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}},
		}}, harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "web -> api /admin denied by a permission", func() bool {
			code, body, _ := web.callPath("api", "/admin/users")
			return code == 403 && strings.Contains(body, "(l7_permission_deny)")
		})
		if code, body, err := web.callPath("api", "/orders"); code != 200 {
			t.Fatalf("web -> api /orders: %d %q %v, want 200", code, body, err)
		}
		m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "web -> api /admin allowed again", func() bool {
			code, _, _ := web.callPath("api", "/admin/users")
			return code == 200
		})
	})

	t.Run("upstream churn: a new instance gets traffic, a killed one loses none", func(t *testing.T) {
		api2 := m.add("api", "api-2")
		harness.WaitFor(t, 15*time.Second, "api-2 in web's pool", func() bool {
			return web.inPool(t, api2.port)
		})
		l := startLoad(web, "api", 4)
		harness.WaitFor(t, 15*time.Second, "traffic on api-2", func() bool {
			l.mu.Lock()
			defer l.mu.Unlock()
			return l.byBody["api-2"] >= 20
		})
		api2.sidecar.Kill()
		killed := time.Now()
		harness.WaitFor(t, 15*time.Second, "api-2 out of web's pool", func() bool {
			return !web.inPool(t, api2.port)
		})
		t.Logf("killed instance left the pool %s after the kill", time.Since(killed).Round(time.Millisecond))
		time.Sleep(500 * time.Millisecond)
		l.finish()
		l.check(t, "load across the kill")
		if l.byBody["api-1"] == 0 {
			t.Fatal("api-1 got no traffic")
		}
	})

	t.Run("a crashed HAProxy is started again", func(t *testing.T) {
		master := parentOf(t, workerPid(t, api1.dir))
		if err := syscall.Kill(master, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 15*time.Second, "api-1 serving again", func() bool {
			return strings.Contains(api1.sidecar.Output(), "haproxy exited unexpectedly") &&
				web.inPool(t, api1.port) && func() bool {
				_, err := haproxy.NewAdmin(filepath.Join(api1.dir, "admin.sock")).Command("show info")
				return err == nil
			}()
		})
		harness.WaitFor(t, 10*time.Second, "web -> api-1 again", func() bool {
			code, _, _ := web.call("api")
			return code == 200
		})
		// The health check (every second) may have run while HAProxy was
		// down and report it critical only now; the next test must not
		// start with api-1 about to leave web's pool.
		harness.WaitSteady(t, 15*time.Second, 1500*time.Millisecond, "api-1 steadily in web's pool", func() bool {
			return web.inPool(t, api1.port)
		})
	})

	t.Run("more instances than slots: a hitless reload loses no request", func(t *testing.T) {
		l := startLoad(web, "api", 4)
		var added []*instance
		for i := 3; i <= 6; i++ {
			added = append(added, m.add("api", fmt.Sprintf("api-%d", i)))
		}
		harness.WaitFor(t, 20*time.Second, "five instances in web's pool", func() bool {
			stat := web.admin(t, "show stat upstream_api 4 -1")
			for _, in := range append(added, api1) {
				if !serverActive(stat, in.port) {
					return false
				}
			}
			return true
		})
		time.Sleep(500 * time.Millisecond)
		l.finish()
		l.check(t, "load across a reload")
		if !strings.Contains(web.sidecar.Output(), "method=reload") {
			t.Fatal("growing the pool past its slots did not reload HAProxy")
		}
		for _, in := range added {
			if l.byBody[in.id] == 0 {
				t.Errorf("%s got no traffic", in.id)
			}
		}
	})
}

// serverActive reports whether `show stat` lists a server on port that is
// not in maintenance.
func serverActive(stat string, port int) bool {
	for _, line := range strings.Split(stat, "\n") {
		f := strings.Split(line, ",")
		if len(f) > 73 && strings.HasSuffix(f[73], fmt.Sprintf(":%d", port)) {
			return !strings.HasPrefix(f[17], "MAINT")
		}
	}
	return false
}

// startEcho serves a TCP echo app and returns its port.
func startEcho(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// echo sends a line through in's upstream to dest and returns what came
// back (an error when the mesh refused).
func (in *instance) echo(dest, line string) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", in.upstream[dest]), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	buf := make([]byte, len(line)+1)
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return strings.TrimSpace(string(buf)), nil
}

func TestSidecarTCP(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("*", deny))
	echo := m.register(&instance{id: "echo-1"}, "echo", "tcp", startEcho(t))
	// An "api" instance that is really echo's sidecar: its certificate
	// names echo, so web must not talk to it as api.
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "impostor-api-sidecar-proxy", Name: "api-sidecar-proxy",
		Address: "127.0.0.1", Port: echo.port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", LocalServicePort: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	web := m.add("web", "web-1", "echo:tcp", "api:tcp")
	harness.WaitFor(t, 10*time.Second, "echo through the mesh", func() bool {
		got, err := web.echo("echo", "ping")
		return err == nil && got == "ping"
	})
	if got, err := web.echo("api", "secret"); err == nil {
		t.Fatalf("web accepted %q from a peer whose certificate names echo, not api", got)
	}
	m.consul.SetIntentions(t, "echo", harness.Source("web", deny))
	harness.WaitFor(t, 5*time.Second, "new TCP connections refused", func() bool {
		_, err := web.echo("echo", "ping")
		return err != nil
	})
	m.consul.SetIntentions(t, "echo", harness.Source("web", allow))
	harness.WaitFor(t, 5*time.Second, "allowed again", func() bool {
		got, err := web.echo("echo", "ping")
		return err == nil && got == "ping"
	})
}

// workerPid asks the HAProxy whose admin socket is in dir for its worker's
// pid.
func workerPid(t testing.TB, dir string) int {
	t.Helper()
	pid, err := haproxy.NewAdmin(filepath.Join(dir, "admin.sock")).WorkerPid()
	if err != nil || pid == 0 {
		t.Fatalf("no worker pid from the admin socket: %d %v", pid, err)
	}
	return pid
}

// parentOf reads a process's parent pid from /proc.
func parentOf(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	_, after, _ := strings.Cut(string(b), ") ")
	var state string
	var ppid int
	fmt.Sscan(after, &state, &ppid)
	return ppid
}

// alive reports whether pid runs (a zombie waiting for its reaper does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, after, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(after, "Z")
}

// newRootKey is a fresh CA key for Consul's built-in provider: giving it
// one rotates the Connect CA root.
func newRootKey(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestSidecarRotationUnderLoad(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	api1 := m.add("api", "api-1")
	web := m.add("web", "web-1", "api")
	harness.WaitFor(t, 10*time.Second, "web -> api", func() bool {
		code, _, _ := web.call("api")
		return code == 200
	})
	webLeaf, apiLeaf := readFile(t, filepath.Join(web.dir, "leaf.pem")), readFile(t, filepath.Join(api1.dir, "leaf.pem"))

	l := startLoad(web, "api", 4)
	time.Sleep(300 * time.Millisecond)
	conf, _, err := m.consul.Client.Connect().CAGetConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	conf.Config["PrivateKey"] = newRootKey(t)
	conf.Config["RootCert"] = ""
	rotated := time.Now()
	if _, err := m.consul.Client.Connect().CASetConfig(conf, nil); err != nil {
		t.Fatalf("rotate the CA: %v", err)
	}
	harness.WaitFor(t, 30*time.Second, "both sidecars on new leaves and both roots", func() bool {
		return readFile(t, filepath.Join(web.dir, "leaf.pem")) != webLeaf &&
			readFile(t, filepath.Join(api1.dir, "leaf.pem")) != apiLeaf &&
			strings.Count(readFile(t, filepath.Join(web.dir, "roots.pem")), "BEGIN CERTIFICATE") == 2 &&
			strings.Count(readFile(t, filepath.Join(api1.dir, "roots.pem")), "BEGIN CERTIFICATE") == 2
	})
	t.Logf("roots and leaves rotated in both sidecars %s after the CA change", time.Since(rotated).Round(time.Millisecond))
	time.Sleep(time.Second) // keep the load on the rotated certificates
	l.finish()
	l.check(t, "load across a CA root and leaf rotation")
	for _, in := range []*instance{web, api1} {
		if out := in.sidecar.Output(); !strings.Contains(out, "method=runtime") || strings.Contains(out, "method=reload") {
			t.Errorf("%s: rotation not applied through the runtime API alone", in.id)
		}
	}
	// A new connection after the rotation: new leaves, new roots.
	if code, body, err := web.call("api"); err != nil || code != 200 {
		t.Fatalf("after the rotation: %d %q %v", code, body, err)
	}
}

func TestSidecarKeepsServingThroughABadRegistration(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	m.add("api", "api-1")
	web := m.add("web", "web-1", "api")
	harness.WaitFor(t, 10*time.Second, "web -> api", func() bool {
		code, _, _ := web.call("api")
		return code == 200
	})
	cfgBefore := readFile(t, filepath.Join(web.dir, "haproxy.cfg"))

	reg := func(bindPort any) {
		t.Helper()
		err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: "web-1", Name: "web", Address: "127.0.0.1", Port: web.app.Listener.Addr().(*net.TCPAddr).Port,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: web.port,
				Proxy: &api.AgentServiceConnectProxyConfig{
					Config: map[string]any{"protocol": "http", "bind_address": "127.0.0.1", "bind_port": bindPort},
					Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: web.upstream["api"],
						Config: map[string]any{"protocol": "http"}}},
				},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	reg(70000)
	harness.WaitFor(t, 10*time.Second, "the error logged", func() bool {
		return strings.Contains(web.sidecar.Output(), "inbound port 70000 is out of range")
	})
	if code, _, err := web.call("api"); err != nil || code != 200 {
		t.Fatalf("web -> api with the broken registration: %d %v", code, err)
	}
	if after := readFile(t, filepath.Join(web.dir, "haproxy.cfg")); after != cfgBefore {
		t.Fatal("the configuration file changed after a rejected registration")
	}
	entries, _ := os.ReadDir(web.dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("left behind in the working directory: %s", e.Name())
		}
	}
	reg(web.port) // fixed: applied again
	harness.WaitFor(t, 10*time.Second, "web -> api after the fix", func() bool {
		code, _, _ := web.call("api")
		return code == 200
	})
}

func TestSidecarStartAndStop(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	// The sidecar starts before its service is registered: it waits.
	dir := harness.TempDir(t)
	port := harness.FreePort(t)
	sc := harness.Start(t, "sidecar late", harness.Binary(t, "haconnect"), "sidecar",
		"-sidecar-for", "late-1", "-consul-addr", m.consul.Addr, "-dir", dir, "-stop-grace", "2s")
	harness.WaitFor(t, 5*time.Second, "the waiting log line", func() bool {
		return strings.Contains(sc.Output(), "no proxy registered for the service yet")
	})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "late") }))
	defer app.Close()
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		ID: "late-1", Name: "api", Address: "127.0.0.1", Port: app.Listener.Addr().(*net.TCPAddr).Port,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port:  port,
			Proxy: &api.AgentServiceConnectProxyConfig{Config: map[string]any{"bind_address": "127.0.0.1"}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", port), 20*time.Second)

	// SIGTERM: HAProxy stops, the sidecar exits 0, nothing is left running.
	worker := workerPid(t, dir)
	if err := sc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	werr, done := sc.Wait(10 * time.Second)
	if !done || werr != nil {
		t.Fatalf("sidecar after SIGTERM: exited=%v err=%v", done, werr)
	}
	if alive(worker) {
		t.Fatalf("haproxy worker %d still running after the sidecar exited", worker)
	}
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
		c.Close()
		t.Fatal("the public listener still accepts connections")
	}
}

// listeningCheck is a sidecar's health check: its public port accepts
// connections. Consul's default for a sidecar checks every 10s, after a
// random first delay, so a proxy that starts after the first run stays out
// of its callers' pools for up to 10s more; checking every second
// (Consul's minimum) keeps that short.
func listeningCheck(port int) api.AgentServiceChecks {
	return api.AgentServiceChecks{{
		Name: "Connect Sidecar Listening", TCP: fmt.Sprintf("127.0.0.1:%d", port),
		Interval: "1s", Timeout: "200ms",
	}}
}
