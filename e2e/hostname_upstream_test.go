// Upstream instances registered with a host name, as Docker and Nomad's
// address_mode produce them: resolved by the sidecar, followed as DNS
// changes, and a name that does not resolve holds back nothing.

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/dnstest"
	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestHostNameUpstreamFollowsDNS registers two instances of api whose
// sidecars listen on the same port of two loopback addresses (127.0.0.2
// and 127.0.0.3) and whose registrations carry host names, api-a and
// api-b, answered by a DNS server the test runs and web's sidecar uses
// (-dns-server); api-1's app is registered by name too. api-a first resolves to api-1's address, api-b not at
// all:
//   - web reaches api-1; api-b's failure is logged once, however many
//     lookups fail;
//   - api-a's answer changes to api-2's address: web's traffic moves there
//     within a few seconds, through the runtime API (HAProxy's worker is
//     the same process);
//   - a CA rotation still reaches web's HAProxy (its public listener serves
//     the re-issued leaf) while api-b does not resolve;
//   - api-b resolves to api-1's address: both instances are served.
func TestHostNameUpstreamFollowsDNS(t *testing.T) {
	dns, err := dnstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dns.Close)
	const nameA, nameB = "api-a.mesh.test", "api-b.mesh.test"
	dns.Set(nameA, "127.0.0.2")

	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	port := harness.FreePort(t) // both api sidecars, on their own address
	// api-1's own app is registered by name too (LocalServiceAddress),
	// resolved by api-1's sidecar through the same DNS server.
	dns.Set("app.api-1.mesh.test", "127.0.0.1")
	api1 := m.addNamed("api-1", nameA, "127.0.0.2", port, "app.api-1.mesh.test", "-dns-server", dns.Addr())
	m.addNamed("api-2", nameB, "127.0.0.3", port, "")
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	web := m.addInstance(&instance{id: "web-1", args: []string{"-dns-server", dns.Addr(), "-metrics-listen", metrics}}, "web", "api")
	metric := func(name string) string { // the sample's value, "" if absent
		resp, err := http.Get("http://" + metrics + "/metrics")
		if err != nil {
			t.Fatalf("web's metrics: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, name+" "); ok {
				return v
			}
		}
		return ""
	}
	const reloads = `haconnect_sidecar_applies_total{method="reload",result="ok"}`

	served := func(id string) func() bool {
		return func() bool {
			code, body, err := web.call("api")
			return err == nil && code == http.StatusOK && strings.HasPrefix(body, id+" ")
		}
	}
	harness.WaitFor(t, 20*time.Second, "web reaching api-1 through "+nameA, served("api-1"))
	// api-b's first lookup may still be under way when api-a answers.
	harness.WaitFor(t, 10*time.Second, "one name unresolved ("+nameB+")", func() bool {
		return metric("haconnect_sidecar_dns_names_unresolved") == "1"
	})
	worker, reloadsBefore := workerPid(t, web.dir), metric(reloads)

	// DNS moves api-a to api-2's address: traffic follows, no reload.
	dns.Set(nameA, "127.0.0.3")
	took := harness.WaitFor(t, 15*time.Second, "web reaching api-2 after the DNS change", func() bool {
		for range 5 { // the old server may be drained by then, not yet out of rotation
			if !served("api-2")() {
				return false
			}
		}
		return true
	})
	t.Logf("traffic moved to the new address %s after the DNS change (lookups every 5s)", took)
	if took > 10*time.Second {
		t.Errorf("traffic took %s to follow DNS, want within the 5s lookup interval and the apply", took)
	}
	if pid, n := workerPid(t, web.dir), metric(reloads); pid != worker || n != reloadsBefore {
		t.Fatalf("HAProxy's worker %d -> %d, reloads %q -> %q: the DNS change was a reload, want the runtime API", worker, pid, reloadsBefore, n)
	}
	if !strings.Contains(web.sidecar.Output(), "method=runtime") {
		t.Fatalf("no runtime apply logged:\n%s", web.sidecar.Output())
	}

	// api-b does not resolve: logged once. The CA rotation still reaches
	// web's HAProxy.
	webLeaf := readFile(t, filepath.Join(web.dir, "leaf.pem"))
	m.rotateCA(t)
	harness.WaitFor(t, 40*time.Second, "web's new leaf", func() bool {
		return readFile(t, filepath.Join(web.dir, "leaf.pem")) != webLeaf
	})
	web.waitServingLeaf(t, 10*time.Second, api1)
	harness.WaitFor(t, 20*time.Second, "web reaching api-2 after the rotation", served("api-2"))
	if n := dns.Queries(nameB); n < 2 {
		t.Fatalf("%s looked up %d times, want again and again", nameB, n)
	}
	notResolving := 0
	for _, l := range strings.Split(web.sidecar.Output(), "\n") {
		if strings.Contains(l, "host name does not resolve") && strings.Contains(l, "name="+nameB) {
			notResolving++
		}
	}
	if notResolving != 1 {
		t.Fatalf("%d log lines say %s does not resolve, want 1:\n%s", notResolving, nameB, web.sidecar.Output())
	}

	// api-b resolves at last, to api-1's address: both are served.
	dns.Set(nameB, "127.0.0.2")
	harness.WaitFor(t, 15*time.Second, "web reaching api-1 and api-2", func() bool {
		seen := map[string]bool{}
		for range 20 {
			_, body, _ := web.call("api")
			id, _, _ := strings.Cut(body, " ")
			seen[id] = true
		}
		return seen["api-1"] && seen["api-2"]
	})
	if got := metric("haconnect_sidecar_dns_names_unresolved"); got != "0" {
		t.Fatalf("names unresolved: %q, want 0", got)
	}
}

// addNamed registers an instance of api whose sidecar listens on
// bindIP:port and is registered with the host name addr, its app at
// local (LocalServiceAddress; "": the default, 127.0.0.1), and starts the
// sidecar with args.
func (m *mesh) addNamed(id, addr, bindIP string, port int, local string, args ...string) *instance {
	t := m.t
	t.Helper()
	in := &instance{id: id, port: port, dir: harness.TempDir(t), upstream: map[string]int{}}
	in.app = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s source=%s", id, r.Header.Get("X-Haconnect-Source"))
	}))
	t.Cleanup(in.app.Close)
	listen := fmt.Sprintf("%s:%d", bindIP, port)
	reg := &api.AgentServiceRegistration{
		ID: id, Name: "api", Address: "127.0.0.1", Port: in.app.Listener.Addr().(*net.TCPAddr).Port,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Address: addr, Port: port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				LocalServiceAddress: local,
				Config:              map[string]any{"protocol": "http", "bind_address": bindIP},
			},
			Checks: api.AgentServiceChecks{{Name: "Connect Sidecar Listening", TCP: listen, Interval: "1s", Timeout: "200ms"}},
		}},
	}
	if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	in.sidecar = harness.Start(t, "sidecar "+id, harness.Binary(t, "haconnect"), append([]string{"sidecar",
		"-sidecar-for", id, "-dir", in.dir, "-ttl", "300ms", "-stop-grace", "2s", "-log-level", "debug"},
		append(m.consul.Flags(m.consul.Addr, ""), args...)...)...)
	harness.WaitListening(t, listen, 20*time.Second)
	return in
}
