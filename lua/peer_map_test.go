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

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

const peerAPI = "spiffe://td.consul/ns/default/dc/dc1/svc/api"

// peerSidecar is a rendered sidecar configuration (one thread) whose
// upstream api presents the certificate cert returns on each connection.
type peerSidecar struct {
	t        *testing.T
	h        *harness.HAProxy
	listener string
	admin    *haproxy.Admin
	mapFile  string
}

func startPeerSidecar(t *testing.T, ca *harness.ForeignCA, cert func() *tls.Certificate) *peerSidecar {
	dir := harness.TempDir(t)
	web := ca.Issue(t, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(ca.CertPEM))
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, SessionTicketsDisabled: true,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert(), nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
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
			Protocol: render.ProtocolHTTP, PeerURI: peerAPI,
			Servers: []render.Server{{Name: "s1", Addr: "127.0.0.1", Port: l.Addr().(*net.TCPAddr).Port}}}},
	}
	out, err := render.Render(m)
	if err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	listener := fmt.Sprintf("127.0.0.1:%d", m.Upstreams[0].BindPort)
	h := harness.StartHAProxy(t, dir, out.Config, listener)
	return &peerSidecar{t: t, h: h, listener: listener, admin: haproxy.NewAdmin(m.AdminSocket), mapFile: m.PeerMapFile}
}

// get makes one request through the upstream listener, which must pass.
func (p *peerSidecar) get() {
	p.t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + p.listener + "/")
	if err != nil {
		p.t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "api" {
		p.t.Fatalf("%d %q", resp.StatusCode, b)
	}
}

// entries counts the map's entries naming api.
func (p *peerSidecar) entries() int {
	p.t.Helper()
	out, err := p.admin.Command("show map " + p.mapFile)
	if err != nil {
		p.t.Fatal(err)
	}
	if p.h.Proc.Exited() {
		p.t.Fatal("HAProxy exited")
	}
	return strings.Count(out, " "+peerAPI+"\n")
}

// TestPeerMapIsBounded: against an upstream that presents a new
// certificate on every connection, each one is checked and passes, and the
// map of known certificates stops growing at the per-thread bound (1024),
// the oldest going first.
func TestPeerMapIsBounded(t *testing.T) {
	const bound, conns = 1024, 1100
	ca := harness.NewForeignCA(t)
	var issued atomic.Int64
	p := startPeerSidecar(t, ca, func() *tls.Certificate {
		issued.Add(1)
		return &ca.Issue(t, peerAPI).TLS
	})
	for i := 0; i < conns; i++ {
		p.get()
	}
	if n := p.entries(); issued.Load() < conns || n != bound {
		t.Fatalf("%d certificates presented, %d in the map, want %d", issued.Load(), n, bound)
	}
}

// TestPeerMapKeepsAReparsedCertificate: a certificate whose entry went
// away (deleted by another thread's bound, here through the runtime API)
// is parsed again on its next response, and stays in the map however often
// that happens: the bound counts certificates, not parses.
func TestPeerMapKeepsAReparsedCertificate(t *testing.T) {
	ca := harness.NewForeignCA(t)
	leaf := ca.Issue(t, peerAPI)
	p := startPeerSidecar(t, ca, func() *tls.Certificate { return &leaf.TLS })
	// The entry's key, as the configuration names the certificate
	// ("<serial>|<issuer>"), read from the map after a first response;
	// the runtime API needs its spaces escaped.
	p.get()
	out, err := p.admin.Command("show map " + p.mapFile)
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(strings.TrimSpace(out))
	if len(fields) < 3 || fields[len(fields)-1] != peerAPI || !strings.Contains(fields[1], "|/CN=") {
		t.Fatalf("show map: %q, want one entry <ref> <serial>|<issuer> %s", out, peerAPI)
	}
	key := strings.Join(fields[1:len(fields)-1], `\ `)
	for i := 0; i < 1100; i++ {
		if _, err := p.admin.Command(fmt.Sprintf("del map %s %s", p.mapFile, key)); err != nil {
			t.Fatal(err)
		}
		p.get()
		if n := p.entries(); n != 1 {
			t.Fatalf("after parse %d of the same certificate: %d entries, want 1", i+1, n)
		}
	}
}
