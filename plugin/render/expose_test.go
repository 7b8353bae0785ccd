package render

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/lua"
)

func TestValidateRefusesBadExposedPaths(t *testing.T) {
	ok := ExposedPath{Path: "/health", ListenerPort: 21500, LocalPathPort: 8080, Protocol: ExposeHTTP}
	for _, tc := range []struct {
		name string
		edit func(*ExposedPath)
		want string
	}{
		{"relative path", func(p *ExposedPath) { p.Path = "health" }, "must start with /"},
		{"space breaks the ACL", func(p *ExposedPath) { p.Path = "/health }  || { always_true" }, "character"},
		{"comment", func(p *ExposedPath) { p.Path = "/a#b" }, "character"},
		{"quote", func(p *ExposedPath) { p.Path = `/a"b` }, "character"},
		{"environment expansion", func(p *ExposedPath) { p.Path = "/${HOME}" }, "character"},
		{"a query is not a path", func(p *ExposedPath) { p.Path = "/health?x=1" }, "character"},
		{"newline", func(p *ExposedPath) { p.Path = "/a\n    server evil 1.2.3.4:80" }, "character"},
		{"listener port", func(p *ExposedPath) { p.ListenerPort = 0 }, "listener port 0"},
		{"local port", func(p *ExposedPath) { p.LocalPathPort = 70000 }, "local path port 70000"},
		{"protocol", func(p *ExposedPath) { p.Protocol = "grpc" }, `protocol "grpc"`},
		{"source", func(p *ExposedPath) { p.CheckID, p.AllowSources = "c", []string{"agent.local"} }, "not an IP address"},
	} {
		m := model()
		p := ok
		tc.edit(&p)
		m.Exposed = []ExposedPath{p}
		if _, err := Render(m); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one mentioning %q", tc.name, err, tc.want)
		}
	}
	// Consul refuses two paths on one listener port; so does the model,
	// and a clash with another listener of the sidecar.
	m := model()
	m.Exposed = []ExposedPath{ok, {Path: "/metrics", ListenerPort: 21500, LocalPathPort: 9102, Protocol: ExposeHTTP}}
	if _, err := Render(m); err == nil || !strings.Contains(err.Error(), "port 21500 is also used by exposed path /health") {
		t.Errorf("two paths on one port: %v", err)
	}
	m.Exposed = []ExposedPath{{Path: "/health", ListenerPort: 21000, LocalPathPort: 8080, Protocol: ExposeHTTP}}
	if _, err := Render(m); err == nil || !strings.Contains(err.Error(), "also used by inbound listener") {
		t.Errorf("a path on the inbound's port: %v", err)
	}
	m.Exposed = []ExposedPath{ok}
	if _, err := Render(m); err != nil {
		t.Fatalf("a valid exposed path: %v", err)
	}
}

// TestExposedPathsServeOnlyTheirPath runs the rendered configuration in a
// real HAProxy: each exposed listener passes its one path to its local
// port (HTTP/1.1, and h2c end to end for http2) and answers 404 to every
// other path without the app seeing it.
func TestExposedPathsServeOnlyTheirPath(t *testing.T) {
	dir := harness.TempDir(t)
	writeTestFiles(t, dir)
	var mu sync.Mutex
	var seen []string
	record := func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.URL.Path)
		mu.Unlock()
		fmt.Fprintf(w, "%s %s source=%q", r.Proto, r.URL.Path, r.Header.Get("X-Haconnect-Source"))
	}
	app := httptest.NewServer(http.HandlerFunc(record))
	t.Cleanup(app.Close)
	h2app := httptest.NewUnstartedServer(http.HandlerFunc(record))
	h2app.Config.Protocols = new(http.Protocols)
	h2app.Config.Protocols.SetUnencryptedHTTP2(true)
	h2app.Start()
	t.Cleanup(h2app.Close)

	m := model()
	m.LeafFile, m.RootsFile = filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	m.SPOEFile, m.AdminSocket = filepath.Join(dir, "spoe.conf"), filepath.Join(dir, "admin.sock")
	m.LuaFile, m.PeerMapFile = filepath.Join(dir, "haconnect.lua"), filepath.Join(dir, "upstream_peers.map")
	m.Upstreams = nil // no traffic anywhere but loopback
	m.Inbound.BindAddr, m.Inbound.BindPort = "127.0.0.1", harness.FreePort(t)
	health, grpc, check := harness.FreePort(t), harness.FreePort(t), harness.FreePort(t)
	m.Exposed = []ExposedPath{
		{Path: "/health", ListenerPort: health, LocalPathPort: portOf(t, app.URL), Protocol: ExposeHTTP},
		{Path: "/grpc.health.v1.Health/Check", ListenerPort: grpc, LocalPathPort: portOf(t, h2app.URL), Protocol: ExposeHTTP2},
		{Path: "/ready", ListenerPort: check, LocalPathPort: portOf(t, app.URL), Protocol: ExposeHTTP,
			CheckID: "service:api-1", AllowSources: []string{"127.0.0.1"}},
	}
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	harness.StartHAProxy(t, dir, out.Config, fmt.Sprintf("127.0.0.1:%d", health),
		fmt.Sprintf("127.0.0.1:%d", grpc), fmt.Sprintf("127.0.0.1:%d", check))

	h1 := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	h2t := &http.Transport{Protocols: new(http.Protocols)}
	h2t.Protocols.SetUnencryptedHTTP2(true)
	h2 := &http.Client{Timeout: 3 * time.Second, Transport: h2t}
	get := func(c *http.Client, port int, path string, hdr ...string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("GET :%d%s: %v", port, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	if code, body := get(h1, health, "/health?verbose=1", "X-Haconnect-Source", "admin"); code != 200 || body != `HTTP/1.1 /health source=""` {
		t.Errorf("exposed /health: %d %q, want 200 from the app without the caller's identity header", code, body)
	}
	if code, body := get(h2, grpc, "/grpc.health.v1.Health/Check"); code != 200 || !strings.HasPrefix(body, "HTTP/2.0 /grpc.health.v1.Health/Check") {
		t.Errorf("exposed http2 path: %d %q, want 200 over h2c to the app", code, body)
	}
	if code, body := get(h1, check, "/ready"); code != 200 || !strings.Contains(body, "/ready") {
		t.Errorf("exposed check path from loopback: %d %q", code, body)
	}
	for _, tc := range []struct {
		c    *http.Client
		port int
		path string
	}{
		{h1, health, "/"}, {h1, health, "/admin"}, {h1, health, "/health/"}, {h1, health, "/healthz"},
		{h1, health, "//health"}, {h1, health, "/%68ealth"}, {h1, health, "/Health"},
		{h1, check, "/health"}, {h2, grpc, "/grpc.health.v1.Health/Watch"},
	} {
		if code, body := get(tc.c, tc.port, tc.path); code != 404 || body != "haconnect: not an exposed path\n" {
			t.Errorf("GET :%d%s: %d %q, want haconnect's 404", tc.port, tc.path, code, body)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"/health", "/grpc.health.v1.Health/Check", "/ready"}; strings.Join(seen, " ") != strings.Join(want, " ") {
		t.Errorf("the apps saw %q, want only %q", seen, want)
	}
}

func portOf(t *testing.T, url string) int {
	t.Helper()
	var p int
	if _, err := fmt.Sscanf(url[strings.LastIndex(url, ":")+1:], "%d", &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeTestFiles writes what the rendered configuration loads: a
// self-signed leaf and roots, the Lua file, the peer map.
func writeTestFiles(t *testing.T, dir string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	keyDER, _ := x509.MarshalECPrivateKey(key)
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	harness.WriteFile(t, dir, "leaf.pem", string(cert)+string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})))
	harness.WriteFile(t, dir, "roots.pem", string(cert))
	harness.WriteFile(t, dir, "haconnect.lua", string(lua.Telemetry))
	harness.WriteFile(t, dir, "upstream_peers.map", "")
}
