// Registration settings haconnect does not implement are refused by name,
// once, and the rest of the registration is served.

package e2e

import (
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestRefusedSettingsAreLoggedOnce registers web with MeshGateway mode
// "local", an upstream api (served), and an upstream geo-db that is a
// prepared query (refused). api must answer through web's sidecar, geo-db's
// local port must not be bound, and each refused setting must be logged by
// name exactly once, even after the registration changes again (db added
// as an upstream, which then answers too).
func TestRefusedSettingsAreLoggedOnce(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	m.consul.SetIntentions(t, "db", harness.Source("web", allow))
	m.add("api", "api-1")
	m.add("db", "db-1")

	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "web") }))
	t.Cleanup(app.Close)
	web := &instance{id: "web-1", port: harness.FreePort(t), dir: harness.TempDir(t), upstream: map[string]int{
		"api": harness.FreePort(t), "geo-db": harness.FreePort(t), "db": harness.FreePort(t)}}
	register := func(names ...string) {
		t.Helper()
		var ups []api.Upstream
		for _, n := range names {
			u := api.Upstream{DestinationName: n, LocalBindPort: web.upstream[n], Config: map[string]any{"protocol": "http"}}
			if n == "geo-db" {
				u.DestinationType = api.UpstreamDestTypePreparedQuery
			}
			ups = append(ups, u)
		}
		reg := &api.AgentServiceRegistration{
			ID: web.id, Name: "web", Address: "127.0.0.1", Port: app.Listener.Addr().(*net.TCPAddr).Port,
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
				Port: web.port,
				Proxy: &api.AgentServiceConnectProxyConfig{
					Config:      map[string]any{"protocol": "http", "bind_address": "127.0.0.1"},
					MeshGateway: api.MeshGatewayConfig{Mode: api.MeshGatewayModeLocal},
					Upstreams:   ups,
				},
				Checks: listeningCheck(web.port),
			}},
		}
		if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
			t.Fatalf("register web: %v", err)
		}
	}
	register("api", "geo-db")
	web.sidecar = harness.Start(t, "sidecar web-1", harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-sidecar-for", web.id, "-dir", web.dir, "-ttl", "300ms", "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, ""))...)

	harness.WaitFor(t, 30*time.Second, "web reaching api", func() bool {
		code, _, err := web.call("api")
		return err == nil && code == http.StatusOK
	})
	unbound := func() {
		t.Helper()
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", web.upstream["geo-db"]), time.Second); err == nil {
			c.Close()
			t.Fatal("the prepared-query upstream's local port is bound")
		}
	}
	unbound()

	// The registration changes: the sidecar reads it again.
	register("api", "geo-db", "db")
	harness.WaitFor(t, 30*time.Second, "web reaching db", func() bool {
		code, _, err := web.call("db")
		return err == nil && code == http.StatusOK
	})
	unbound()
	if code, _, err := web.call("api"); err != nil || code != http.StatusOK {
		t.Fatalf("web to api after the change: %d %v", code, err)
	}

	// Each refusal (setting, upstream) is logged once.
	refused := map[string]int{}
	re := regexp.MustCompile(`registration setting refused.*setting=(\S+)(?:.* upstream=(\S+))?`)
	for _, l := range strings.Split(web.sidecar.Output(), "\n") {
		if s := re.FindStringSubmatch(l); s != nil {
			refused[s[1]+" "+s[2]]++
		}
	}
	// Consul copies the proxy's mesh gateway mode into each upstream: that
	// is still the one setting, logged once.
	want := map[string]int{"Proxy.MeshGateway.Mode ": 1, "Upstreams.DestinationType geo-db": 1}
	if !maps.Equal(refused, want) {
		t.Errorf("refusals logged (setting upstream: times) %v, want %v", refused, want)
	}
	if t.Failed() {
		t.Logf("sidecar output:\n%s", web.sidecar.Output())
	}
}
