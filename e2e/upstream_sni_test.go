package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// sniRecorder is an upstream sidecar under the test's control: a TLS
// server with a real Consul leaf that requires a client certificate from
// Consul's CA, as Envoy's public listener does, and records the server
// name of every ClientHello.
type sniRecorder struct {
	port  int
	mu    sync.Mutex
	names []string
}

// peerListener is an upstream sidecar's public listener under the test's
// control: TLS with leaf (the upstream's real Consul leaf), a client
// certificate from Consul's CA required, as Envoy's public listener does;
// with, when set, changes the TLS settings.
func peerListener(t *testing.T, leaf *harness.Leaf, rootsPEM string, with func(*tls.Config)) net.Listener {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(rootsPEM))
	cfg := &tls.Config{Certificates: []tls.Certificate{leaf.TLS}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	if with != nil {
		with(cfg)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func startSNIRecorder(t *testing.T, leaf *harness.Leaf, rootsPEM string) *sniRecorder {
	t.Helper()
	r := &sniRecorder{}
	l := peerListener(t, leaf, rootsPEM, func(cfg *tls.Config) {
		// Every connection makes a full handshake, so every one is seen.
		cfg.SessionTicketsDisabled = true
		cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			r.mu.Lock()
			r.names = append(r.names, h.ServerName)
			r.mu.Unlock()
			return nil, nil
		}
	})
	r.port = l.Addr().(*net.TCPAddr).Port
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "fake api")
	})}
	srv.SetKeepAlivesEnabled(false)
	go func() { _ = srv.Serve(l) }()
	return r
}

// take returns the server names recorded since the last take.
func (r *sniRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.names
	r.names = nil
	return n
}

// TestUpstreamSNI: the sidecar computes Consul's SNI for each upstream as
// an Envoy peer expects it, and does not send it, because HAProxy 2.6
// would then refuse every Consul leaf:
//   - web has three upstreams named api: no datacenter, dc1 named (the
//     local one) and dc2 (unknown here). The first two reach the upstream
//     sidecar (each its own HAProxy sections), dc2's answers 503;
//   - the upstream sidecar, a TLS server with api's real Consul leaf,
//     sees no server name from web's HAProxy, and the full chain check
//     and the SPIFFE check pass;
//   - the sidecar logs each upstream's SNI once:
//     api.default.dc1.internal.<td> twice, api.default.dc2.internal.<td>;
//   - the reason, against the same peer: a HAProxy 2.6 server line with
//     `verify required` and `sni` set to the logged names delivers them
//     (the peer reads exactly those), and fails every handshake.
func TestUpstreamSNI(t *testing.T) {
	m := newMesh(t)
	roots, td := m.consul.RootsPEM(t)
	peer := startSNIRecorder(t, m.consul.IssueLeaf(t, "api"), roots)
	registerPeer(t, m.consul, "api", peer.port)
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web",
		api.Upstream{DestinationName: "api"},
		api.Upstream{DestinationName: "api", Datacenter: "dc1"},
		api.Upstream{DestinationName: "api", Datacenter: "dc2"})

	for _, up := range []string{"api", "api@dc1"} {
		harness.WaitFor(t, 20*time.Second, "web reaching "+up, func() bool {
			code, body, err := web.call(up)
			return err == nil && code == http.StatusOK && body == "fake api"
		})
	}
	if code, body, err := web.call("api@dc2"); err != nil || code != http.StatusServiceUnavailable {
		t.Errorf("api@dc2's local port: %d %q %v, want 503", code, body, err)
	}
	peer.take()
	for i := 0; i < 4; i++ {
		for _, up := range []string{"api", "api@dc1"} {
			if code, body, err := web.call(up); err != nil || code != http.StatusOK || body != "fake api" {
				t.Errorf("%s: %d %q %v", up, code, body, err)
			}
		}
	}
	names := peer.take()
	if len(names) < 8 {
		t.Errorf("the peer saw %d handshakes for 8 requests without keep-alive", len(names))
	}
	for _, n := range names {
		if n != "" {
			t.Errorf("web's HAProxy sent server name %q: HAProxy 2.6 would then check it against the leaf's DNS names", n)
		}
	}

	sni := map[string]string{
		"api":     "api.default.dc1.internal." + td,
		"api@dc1": "api.default.dc1.internal." + td,
		"api@dc2": "api.default.dc2.internal." + td,
	}
	out := logText(web.sidecar)
	cfg := readFile(t, filepath.Join(web.dir, "haproxy.cfg"))
	for up, want := range sni {
		n := 0
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "upstream SNI not sent") && strings.Contains(l, "upstream="+up+" sni="+want) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: %d log lines giving SNI %s, want 1", up, n, want)
		}
		if !strings.Contains(cfg, "#   "+want+"\n") {
			t.Errorf("%s: SNI %s not in the rendered configuration", up, want)
		}
	}
	for _, section := range []string{"backend upstream_api\n", "backend upstream_api:dc1\n", "backend upstream_api:dc2\n"} {
		if strings.Count(cfg, "\n"+section) != 1 {
			t.Errorf("%q: not exactly one such section", section)
		}
	}

	// A second instance of api reaches the same-name upstreams through the
	// runtime API (their backends named with the datacenter), no reload.
	peer2 := startSNIRecorder(t, m.consul.IssueLeaf(t, "api"), roots)
	before := strings.Count(web.sidecar.Output(), "reload_reason=")
	runtimeBefore := strings.Count(web.sidecar.Output(), "method=runtime")
	if err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "fake-api-2-sidecar-proxy", Name: "api-sidecar-proxy",
		Address: "127.0.0.1", Port: peer2.port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", LocalServicePort: 1},
	}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 20*time.Second, "api@dc1 reaching the second instance", func() bool {
		code, _, err := web.call("api@dc1")
		return err == nil && code == http.StatusOK && len(peer2.take()) > 0
	})
	if after := strings.Count(web.sidecar.Output(), "reload_reason="); after != before {
		t.Errorf("a new instance reloaded HAProxy (%d reloads logged, was %d): same-name upstreams must take it through the runtime API", after, before)
	}
	if strings.Count(web.sidecar.Output(), "method=runtime") == runtimeBefore {
		t.Error("no runtime API change logged for the new instance")
	}

	// Why it is not sent: the same peer behind HAProxy 2.6 server lines
	// that send the logged names, and one that sends none.
	dir := harness.TempDir(t)
	ports := map[string]int{"no SNI": harness.FreePort(t), sni["api"]: harness.FreePort(t), sni["api@dc2"]: harness.FreePort(t)}
	var b strings.Builder
	fmt.Fprintf(&b, "defaults\n    mode http\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n")
	var waits []string
	for name, port := range ports {
		opt := ""
		if name != "no SNI" {
			opt = " sni str(" + name + ")"
		}
		fmt.Fprintf(&b, "listen l%d\n    bind 127.0.0.1:%d\n    server peer 127.0.0.1:%d ssl crt %s ca-file %s verify required%s\n",
			port, port, peer.port, filepath.Join(web.dir, "leaf.pem"), filepath.Join(web.dir, "roots.pem"), opt)
		waits = append(waits, fmt.Sprintf("127.0.0.1:%d", port))
	}
	harness.StartHAProxy(t, dir, b.String(), waits...)
	client := &http.Client{Timeout: 5 * time.Second}
	for name, port := range ports {
		peer.take()
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		resp.Body.Close()
		seen := peer.take()
		if name == "no SNI" {
			if resp.StatusCode != http.StatusOK || len(seen) != 1 || seen[0] != "" {
				t.Errorf("without SNI: %d, peer saw %q; want 200 and one handshake without a name", resp.StatusCode, seen)
			}
			continue
		}
		if len(seen) == 0 {
			t.Errorf("sni %s: the peer saw no handshake", name)
		}
		for _, s := range seen {
			if s != name {
				t.Errorf("sni %s: the peer read %q", name, s)
			}
		}
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("sni %s with verify required: %d, want 503 (HAProxy 2.6 checks the name against the leaf's DNS SANs and CN); "+
				"if this HAProxy accepts a Consul leaf now, the sidecar can send the SNI", name, resp.StatusCode)
		}
	}
}

// TestUpstreamThroughTerminatingGateway: Consul answers the instances of
// a service linked to a terminating gateway with the gateway, which picks
// the service by the SNI that HAProxy 2.6 cannot send. The sidecar leaves
// the gateway out and says so once: legacy's local port answers 503 at
// once, the gateway (here a TLS server holding legacy's real leaf, as
// Consul gives a terminating gateway) sees no connection, and the other
// upstream keeps working.
func TestUpstreamThroughTerminatingGateway(t *testing.T) {
	m := newMesh(t)
	roots, _ := m.consul.RootsPEM(t)
	gw := startSNIRecorder(t, m.consul.IssueLeaf(t, "legacy"), roots)
	peer := startSNIRecorder(t, m.consul.IssueLeaf(t, "api"), roots)
	registerPeer(t, m.consul, "api", peer.port)
	agent := m.consul.Client.Agent()
	for _, r := range []*api.AgentServiceRegistration{
		{Kind: api.ServiceKindTerminatingGateway, ID: "tgw-1", Name: "tgw", Address: "127.0.0.1", Port: gw.port},
		{ID: "legacy-1", Name: "legacy", Address: "127.0.0.1", Port: 1},
	} {
		if err := agent.ServiceRegister(r); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := m.consul.Client.ConfigEntries().Set(&api.TerminatingGatewayConfigEntry{
		Kind: api.TerminatingGateway, Name: "tgw", Services: []api.LinkedService{{Name: "legacy"}}}, nil); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 10*time.Second, "Consul answering legacy's instances with the gateway", func() bool {
		entries, _, err := m.consul.Client.Health().Connect("legacy", "", true, nil)
		return err == nil && len(entries) == 1 && entries[0].Service.Kind == api.ServiceKindTerminatingGateway
	})

	web := m.add("web", "web-1", "api", "legacy")
	harness.WaitFor(t, 20*time.Second, "web reaching api", func() bool {
		code, body, err := web.call("api")
		return err == nil && code == http.StatusOK && body == "fake api"
	})
	for i := 0; i < 3; i++ {
		if code, body, err := web.call("legacy"); err != nil || code != http.StatusServiceUnavailable {
			t.Errorf("legacy's local port: %d %q %v, want 503", code, body, err)
		}
	}
	if seen := gw.take(); len(seen) != 0 {
		t.Errorf("the gateway saw %d handshakes (server names %q): it cannot route them", len(seen), seen)
	}
	n := 0
	for _, l := range strings.Split(logText(web.sidecar), "\n") {
		if strings.Contains(l, "upstream served by a terminating gateway") && strings.Contains(l, "upstream=legacy gateway=tgw") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d log lines naming legacy's terminating gateway, want 1", n)
	}
}
