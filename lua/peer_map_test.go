package lua

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// TestPeerMapIsBounded runs a rendered sidecar configuration (one thread)
// against an upstream that presents a new certificate on every connection:
// each one is checked and passes, and the map of known certificates stops
// growing at the per-thread bound (1024), the oldest going first.
func TestPeerMapIsBounded(t *testing.T) {
	const bound, conns = 1024, 1100
	dir := harness.TempDir(t)
	ca := harness.NewForeignCA(t)
	apiURI := "spiffe://td.consul/ns/default/dc/dc1/svc/api"
	web := ca.Issue(t, "spiffe://td.consul/ns/default/dc/dc1/svc/web")

	var issued atomic.Int64
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(ca.CertPEM))
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, SessionTicketsDisabled: true,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			issued.Add(1)
			return &ca.Issue(t, apiURI).TLS, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "api") })}
	srv.SetKeepAlivesEnabled(false)
	go srv.Serve(l)

	m := &render.Model{
		Service: "web", SelfURI: "spiffe://td.consul/ns/default/dc/dc1/svc/web",
		LeafFile:    harness.WriteFile(t, dir, "leaf.pem", web.CertPEM+web.KeyPEM),
		RootsFile:   harness.WriteFile(t, dir, "roots.pem", ca.CertPEM),
		LuaFile:     harness.WriteFile(t, dir, "haconnect.lua", string(Telemetry)),
		PeerMapFile: harness.WriteFile(t, dir, "upstream_peers.map", ""),
		SPOEFile:    filepath.Join(dir, "spoe.conf"), AdminSocket: filepath.Join(dir, "admin.sock"),
		SPOAAddr: "unix@" + filepath.Join(dir, "spoa.sock"), Threads: 1,
		Inbound: render.Inbound{BindAddr: "127.0.0.1", BindPort: harness.FreePort(t), Protocol: render.ProtocolHTTP,
			LocalAddr: "127.0.0.1", LocalPort: 1},
		Upstreams: []render.Upstream{{Name: "api", BindAddr: "127.0.0.1", BindPort: harness.FreePort(t),
			Protocol: render.ProtocolHTTP, PeerURI: apiURI,
			Servers: []render.Server{{Name: "s1", Addr: "127.0.0.1", Port: l.Addr().(*net.TCPAddr).Port}}}},
	}
	out, err := render.Render(m)
	if err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	listener := fmt.Sprintf("127.0.0.1:%d", m.Upstreams[0].BindPort)
	h := harness.StartHAProxy(t, dir, out.Config, listener)

	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := 0; i < conns; i++ {
		resp, err := c.Get("http://" + listener + "/")
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "api" {
			t.Fatalf("request %d: %d %q", i+1, resp.StatusCode, b)
		}
	}
	entries, err := haproxy.NewAdmin(m.AdminSocket).Command("show map " + m.PeerMapFile)
	if err != nil {
		t.Fatal(err)
	}
	n := strings.Count(entries, " "+apiURI+"\n")
	if issued.Load() < conns || n != bound {
		t.Fatalf("%d certificates presented, %d in the map, want %d", issued.Load(), n, bound)
	}
	if h.Proc.Exited() {
		t.Fatal("HAProxy exited")
	}
}
