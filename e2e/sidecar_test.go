package e2e

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

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
	rotated := time.Now()
	m.rotateCA(t)
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
	// The roots go through the runtime API. The one reload allowed is the
	// leaf's (reload_reason leaf, or leaf_after_ca_file when Consul
	// re-issues it after the roots, apart, as it does here, seconds
	// later): HAProxy 2.6.12 cannot commit a Consul leaf to a listener
	// (plugin/sidecar/plan.go). That reload loses no request either: the
	// load check above stands.
	for _, in := range []*instance{web, api1} {
		out := in.sidecar.Output()
		together := false // roots and leaf in one change: one reload for both
		for _, line := range strings.Split(out, "\n") {
			together = together || (strings.Contains(line, "reload_reason=leaf") && !strings.Contains(line, "reload_reason=leaf_after_ca_file"))
		}
		if !strings.Contains(out, "method=runtime") && !together {
			t.Errorf("%s: the roots not applied through the runtime API", in.id)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "method=reload") && !strings.Contains(line, "reload_reason=leaf") {
				t.Errorf("%s: a reload other than the leaf's after the roots: %s", in.id, line)
			}
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
