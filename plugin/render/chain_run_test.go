package render

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/chain"
)

// chainRig is a sidecar's upstream routed by a discovery chain, run in a
// real HAProxy 2.6 exactly as rendered: mTLS with a test CA to tiny TLS
// servers that carry their target's SPIFFE ID (the identity check runs
// as in production), a plain local port for the caller.
type chainRig struct {
	t    *testing.T
	port int // the upstream's local port
	c    *http.Client
}

// appServer is one target instance: it answers "<name> <path?query>" and
// echoes the request headers the tests look at; ?sleep=<duration> delays
// the answer.
func appServer(t *testing.T, ca *harness.ForeignCA, name, uri string) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		if strings.HasPrefix(name, "503") {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintf(w, "%s %s %s", name, r.Proto, r.URL.RequestURI())
		for _, h := range []string{"X-Split", "X-Route", "X-Drop", "X-A", "X-B"} {
			if v := r.Header.Values(h); len(v) > 0 {
				fmt.Fprintf(w, " %s=%s", strings.ToLower(h), strings.Join(v, ","))
			}
		}
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, uri).TLS}}
	srv.EnableHTTP2 = true                           // h2 when HAProxy offers it (ALPN, http2 and grpc upstreams)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // health checks close after the handshake
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func slot(t *testing.T, name string, s *httptest.Server) Server {
	t.Helper()
	host, _, _ := net.SplitHostPort(s.Listener.Addr().String())
	return Server{Name: name, Addr: host, Port: portOf(t, s.URL)}
}

// startChain renders m (its first upstream on a free port) and runs it.
func startChain(t *testing.T, ca *harness.ForeignCA, m *Model) *chainRig {
	t.Helper()
	dir := harness.TempDir(t)
	writeTestFiles(t, dir)
	leaf := ca.Issue(t, m.SelfURI)
	harness.WriteFile(t, dir, "leaf.pem", leaf.CertPEM+leaf.KeyPEM)
	harness.WriteFile(t, dir, "roots.pem", ca.CertPEM)
	m.LeafFile, m.RootsFile = filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	m.SPOEFile, m.AdminSocket = filepath.Join(dir, "spoe.conf"), filepath.Join(dir, "admin.sock")
	m.LuaFile, m.PeerMapFile = filepath.Join(dir, "haconnect.lua"), filepath.Join(dir, "upstream_peers.map")
	m.SPOAAddr = "unix@" + filepath.Join(dir, "spoa.sock") // never reached: no inbound traffic
	m.Inbound.BindAddr, m.Inbound.BindPort = "127.0.0.1", harness.FreePort(t)
	m.Upstreams[0].BindPort = harness.FreePort(t)
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	addr := fmt.Sprintf("127.0.0.1:%d", m.Upstreams[0].BindPort)
	harness.StartHAProxy(t, dir, out.Config, addr)
	return &chainRig{t: t, port: m.Upstreams[0].BindPort, c: &http.Client{Timeout: 5 * time.Second}}
}

// get sends a GET through the upstream's port; hdr are name, value pairs.
func (r *chainRig) get(path string, hdr ...string) (int, string, http.Header) {
	r.t.Helper()
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", r.port, path), nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := r.c.Do(req)
	if err != nil {
		r.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

const (
	tEmpty    = "empty.api.default.default.dc1"
	tImposter = "imposter.api.default.default.dc1"
	tDead     = "dead.api.default.default.dc1"
)

func peerOf(svc string) string { return "spiffe://td.consul/ns/default/dc/dc1/svc/" + svc }

// routedModel: v1 (two instances, consistent hashing on x-user), v2 (one),
// api-backup (another service, one), empty (no instance: every slot free),
// imposter (an instance whose certificate is another service's).
func routedModel(t *testing.T, ca *harness.ForeignCA) *Model {
	m := model()
	u := &m.Upstreams[0]
	u.Servers = nil
	byHeader := chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "header", Name: "x-user"}}}
	u.Targets = []Target{
		{ID: tV1, PeerURI: peerOf("api"), Balance: byHeader, Servers: []Server{
			slot(t, "s1", appServer(t, ca, "v1a", peerOf("api"))), slot(t, "s2", appServer(t, ca, "v1b", peerOf("api"))), {Name: "s3"}}},
		{ID: tV2, PeerURI: peerOf("api"), Servers: []Server{slot(t, "s1", appServer(t, ca, "v2", peerOf("api"))), {Name: "s2"}}},
		{ID: tBackup, PeerURI: peerOf("api-backup"), Servers: []Server{slot(t, "s1", appServer(t, ca, "backup", peerOf("api-backup")))}},
		{ID: tEmpty, PeerURI: peerOf("api"), Servers: []Server{{Name: "s1"}, {Name: "s2"}}},
		{ID: tImposter, PeerURI: peerOf("api"), Servers: []Server{slot(t, "s1", appServer(t, ca, "imposter", peerOf("evil")))}},
		// An instance that is gone (nothing listens): HAProxy's own check
		// takes it out.
		{ID: tDead, PeerURI: peerOf("api"), Servers: []Server{{Name: "s1", Addr: "127.0.0.1", Port: harness.FreePort(t)}}},
	}
	named := func(name string) chain.HeaderModifiers {
		return chain.HeaderModifiers{Set: map[string]string{"x-hc-route": name}}
	}
	to := func(targets ...string) []Split { return []Split{{Weight: 10000, Targets: targets}} }
	u.Routes = []Route{
		{Match: &chain.Match{Headers: []chain.HeaderMatch{{Name: "x-canary", Exact: `canary's "1" $HOME #x`}}},
			ResponseHeaders: named("canary"), Splits: to(tV2)},
		{Match: &chain.Match{Headers: []chain.HeaderMatch{{Name: "x-ver", Regex: `v\d+`}, {Name: "x-skip", Present: true, Invert: true}}},
			ResponseHeaders: named("ver"), Splits: to(tV2)},
		{Match: &chain.Match{Headers: []chain.HeaderMatch{{Name: "x-tier", Exact: "gold", Invert: true}}},
			ResponseHeaders: named("not-gold"), Splits: to(tV2)},
		{Match: &chain.Match{PathPrefix: "/old/"}, PrefixRewrite: "/new/", RewriteFrom: "/old/",
			RequestHeaders: chain.HeaderModifiers{Set: map[string]string{"x-route": "old 100%%", "x-b": "set"}, Add: map[string]string{"x-a": "1", "x-b": "added"},
				Remove: []string{"x-drop"}}, ResponseHeaders: named("old"), Splits: to(tV2)},
		{Match: &chain.Match{PathPrefix: "/t/"}, RequestTimeoutMS: 300, Retry: chain.Retry{ConnectFailure: true},
			ResponseHeaders: named("timeout"), Splits: to(tV2)},
		{Match: &chain.Match{PathPrefix: "/failover/"}, ResponseHeaders: named("failover"), Splits: to(tEmpty, tBackup)},
		{Match: &chain.Match{PathPrefix: "/dead/"}, ResponseHeaders: named("dead"), Splits: to(tDead, tBackup)},
		{Match: &chain.Match{PathPrefix: "/primary/"}, ResponseHeaders: named("primary"), Splits: to(tV2, tBackup)},
		{Match: &chain.Match{PathPrefix: "/query/", Query: []chain.QueryMatch{{Name: "debug", Present: true}, {Name: "v", Exact: "2"}, {Name: "id", Regex: `\d+`}}},
			ResponseHeaders: named("query"), Splits: to(tV2)},
		{Match: &chain.Match{PathPrefix: "/hash/", Methods: []string{"GET"}}, ResponseHeaders: named("hash"), Splits: to(tV1)},
		{Match: &chain.Match{PathPrefix: "/imposter/"}, Splits: to(tImposter)},
		{ResponseHeaders: named("default"), Splits: []Split{
			{Weight: 8000, Targets: []string{tV1}, RequestHeaders: chain.HeaderModifiers{Set: map[string]string{"x-split": "80"}}},
			{Weight: 2000, Targets: []string{tV2}, RequestHeaders: chain.HeaderModifiers{Set: map[string]string{"x-split": "20"}}}}},
	}
	return m
}

// TestChainRoutesRequestsInHAProxy runs a rendered chain in a real
// HAProxy: header routes (exact with quotes, '$' and '#'; full-match regex;
// an inverted present match), a prefix rewrite with header modifiers seen
// by the app, a per-route server timeout, failover when the primary has no
// instance, consistent hashing by header, an 80/20 split, and each
// target's own identity check.
func TestChainRoutesRequestsInHAProxy(t *testing.T) {
	ca := harness.NewForeignCA(t)
	r := startChain(t, ca, routedModel(t, ca))

	route := func(h http.Header) string { return h.Get("X-Hc-Route") }
	server := func(body string) string { return strings.Fields(body + " ")[0] }

	t.Run("failover when the primary's instance is down", func(t *testing.T) {
		// First, timed from HAProxy's start: the check (inter 1s, fall 2)
		// marks the instance down; until then its requests fail
		// (connection refused, retried on it alone).
		took := harness.WaitFor(t, 10*time.Second, "failover from a dead instance", func() bool {
			_, body, _ := r.get("/dead/x")
			return server(body) == "backup"
		})
		t.Logf("a dead primary instance: traffic on the failover target after %s", took.Round(100*time.Millisecond))
		for range 10 {
			if code, body, _ := r.get("/dead/x"); code != 200 || server(body) != "backup" {
				t.Fatalf("after the primary's instance was marked down: %d %q", code, body)
			}
		}
	})

	t.Run("header routes", func(t *testing.T) {
		for range 20 {
			if code, body, h := r.get("/", "x-canary", `canary's "1" $HOME #x`); code != 200 || server(body) != "v2" || route(h) != "canary" {
				t.Fatalf("canary header: %d %q route %q, want v2 every time", code, body, route(h))
			}
		}
		for _, v := range []string{`canary's "1" /root #x`, `canary's`, `canary's "1" $HOME #xy`} {
			if _, _, h := r.get("/", "x-canary", v); route(h) != "default" {
				t.Errorf("x-canary %q took route %q, want default", v, route(h))
			}
		}
		if _, body, h := r.get("/", "x-ver", "v12"); route(h) != "ver" || server(body) != "v2" {
			t.Errorf("x-ver v12: route %q %q, want the regex route to v2", route(h), body)
		}
		// Envoy's regex matches the whole value; so must HAProxy's.
		for _, v := range []string{"v12x", "xv12", "v"} {
			if _, _, h := r.get("/", "x-ver", v); route(h) != "default" {
				t.Errorf("x-ver %q took route %q, want default (regex matches the whole value)", v, route(h))
			}
		}
		if _, _, h := r.get("/", "x-ver", "v1", "x-skip", ""); route(h) != "default" {
			t.Errorf("inverted present match: with x-skip the route is %q, want default", route(h))
		}
		// An inverted value test needs the header (Envoy's rule).
		for v, want := range map[string]string{"silver": "not-gold", "gold": "default", "": "default"} {
			hdr := []string{"x-tier", v}
			if v == "" {
				hdr = nil
			}
			if _, _, h := r.get("/", hdr...); route(h) != want {
				t.Errorf("x-tier %q (inverted exact gold): route %q, want %q", v, route(h), want)
			}
		}
	})

	t.Run("query parameters", func(t *testing.T) {
		for q, want := range map[string]string{
			"debug&v=2&id=12": "query", "id=7&debug=&v=2": "query", "v=2&id=1&debug": "query",
			"v=2&id=12": "default", "debug&v=20&id=12": "default", "debug&v=2&id=12x": "default", "debugx&v=2&id=1": "default",
		} {
			if _, _, h := r.get("/query/?" + q); route(h) != want {
				t.Errorf("query %q: route %q, want %q", q, route(h), want)
			}
		}
	})

	t.Run("prefix rewrite and request headers", func(t *testing.T) {
		code, body, h := r.get("/old/items?id=7", "x-drop", "secret", "x-a", "0")
		if want := "v2 HTTP/1.1 /new/items?id=7 x-route=old 100% x-a=0,1 x-b=set"; code != 200 || body != want || route(h) != "old" {
			t.Errorf("rewritten request: %d %q route %q, want the app to see %q", code, body, route(h), want)
		}
		if _, body, _ := r.get("/older/x"); strings.Contains(body, "/new") {
			t.Errorf("/older/x was rewritten: %q", body)
		}
	})

	t.Run("per-route timeout", func(t *testing.T) {
		start := time.Now()
		code, _, _ := r.get("/t/x?sleep=2s")
		if took := time.Since(start); code != 504 || took > 1500*time.Millisecond {
			t.Errorf("route with a 300ms timeout: %d after %s, want 504 after about 300ms", code, took)
		}
		if code, body, _ := r.get("/x?sleep=1s"); code != 200 {
			t.Errorf("a route without a timeout: %d %q, want 200 after 1s", code, body)
		}
	})

	t.Run("failover", func(t *testing.T) {
		for range 10 {
			if code, body, h := r.get("/failover/x"); code != 200 || server(body) != "backup" || route(h) != "failover" {
				t.Fatalf("primary without instances: %d %q, want the failover target", code, body)
			}
			if code, body, _ := r.get("/primary/x"); code != 200 || server(body) != "v2" {
				t.Fatalf("primary with an instance: %d %q, want the primary", code, body)
			}
		}
	})

	t.Run("consistent hashing by header", func(t *testing.T) {
		servers := map[string]bool{}
		for i := range 20 {
			user := fmt.Sprintf("user-%d", i)
			_, first, _ := r.get("/hash/", "x-user", user)
			for range 5 {
				if _, body, h := r.get("/hash/", "x-user", user); server(body) != server(first) || route(h) != "hash" {
					t.Fatalf("x-user %s went to %q then %q", user, server(first), server(body))
				}
			}
			servers[server(first)] = true
		}
		if !servers["v1a"] || !servers["v1b"] {
			t.Errorf("20 keys all went to %v: not hashed over both instances", servers)
		}
	})

	t.Run("identity per target", func(t *testing.T) {
		if code, body, _ := r.get("/imposter/x"); code != 502 || strings.Contains(body, "imposter") {
			t.Errorf("a target instance with another service's certificate: %d %q, want 502", code, body)
		}
	})

	t.Run("80/20 split", func(t *testing.T) {
		const n = 2000
		count := map[string]int{}
		for range n {
			code, body, _ := r.get("/split")
			if code != 200 {
				t.Fatalf("split: %d %q", code, body)
			}
			switch {
			case strings.HasPrefix(body, "v1") && strings.HasSuffix(body, "x-split=80"):
				count["v1"]++
			case strings.HasPrefix(body, "v2") && strings.HasSuffix(body, "x-split=20"):
				count["v2"]++
			default:
				t.Fatalf("split: unexpected answer %q", body)
			}
		}
		share := float64(count["v1"]) * 100 / n
		t.Logf("80/20 split over %d requests: v1 %.1f%%, v2 %.1f%%", n, share, 100-share)
		if share < 77 || share > 83 {
			t.Errorf("v1 got %.1f%% of %d requests, want 80 ± 3", share, n)
		}
	})
}

// TestChainTCPFailoverInHAProxy: a TCP upstream's chain is its resolver:
// connections go to the first target with a usable server, chosen per
// connection with tcp-request content and use_backend on a variable.
func TestChainTCPFailoverInHAProxy(t *testing.T) {
	ca := harness.NewForeignCA(t)
	m := model()
	u := &m.Upstreams[0]
	u.Protocol, u.Servers = ProtocolTCP, nil
	m.Inbound.Protocol = ProtocolTCP
	u.Targets = []Target{
		{ID: tEmpty, PeerURI: peerOf("api"), Servers: []Server{{Name: "s1"}}},
		{ID: tBackup, PeerURI: peerOf("api-backup"), Balance: chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "source_ip"}}},
			Servers: []Server{slot(t, "s1", appServer(t, ca, "backup", peerOf("api-backup")))}},
	}
	u.Routes = []Route{{Splits: []Split{{Weight: 10000, Targets: []string{tEmpty, tBackup}}}}}
	r := startChain(t, ca, m)
	for range 5 {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", r.port), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(conn, "GET /tcp HTTP/1.0\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("through the TCP upstream: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		conn.Close()
		if resp.StatusCode != 200 || string(b) != "backup HTTP/1.0 /tcp" {
			t.Fatalf("TCP failover: %d %q, want the failover target", resp.StatusCode, b)
		}
	}
}

// TestChainRetriesPerRouteInHAProxy: one target, an instance answering
// 503 and one answering 200, round robin. A route without a retry policy
// keeps haconnect's defaults (a GET answered 503 is retried on the other
// instance); a route whose policy retries only failed connections sees
// the 503s.
func TestChainRetriesPerRouteInHAProxy(t *testing.T) {
	ca := harness.NewForeignCA(t)
	m := model()
	u := &m.Upstreams[0]
	u.Servers = nil
	u.Targets = []Target{{ID: tV1, PeerURI: peerOf("api"), Servers: []Server{
		slot(t, "s1", appServer(t, ca, "503-a", peerOf("api"))), slot(t, "s2", appServer(t, ca, "ok-b", peerOf("api")))}}}
	u.Routes = []Route{
		{Match: &chain.Match{PathPrefix: "/connect-only/"}, Retry: chain.Retry{NumRetries: 2, ConnectFailure: true},
			Splits: []Split{{Weight: 10000, Targets: []string{tV1}}}},
		{Splits: []Split{{Weight: 10000, Targets: []string{tV1}}}},
	}
	r := startChain(t, ca, m)
	count := func(path string) (ok, unavailable int) {
		for range 20 {
			switch code, body, _ := r.get(path); code {
			case 200:
				ok++
			case 503:
				unavailable++
			default:
				t.Fatalf("%s: %d %q", path, code, body)
			}
		}
		return
	}
	if ok, bad := count("/retried/"); ok != 20 {
		t.Errorf("default policy: %d of 20 GETs answered 503, want every 503 retried on the other instance", bad)
	}
	if ok, bad := count("/connect-only/"); bad < 5 || ok < 5 {
		t.Errorf("connect-failure policy: %d ok, %d answered 503; want the 503s seen (about half)", ok, bad)
	}
}

// TestChainHTTP2InHAProxy: an http2 upstream's chain routes h2c streams
// from the app and reaches its targets in h2 over mTLS (ALPN).
func TestChainHTTP2InHAProxy(t *testing.T) {
	ca := harness.NewForeignCA(t)
	m := model()
	u := &m.Upstreams[0]
	u.Protocol, u.Servers = ProtocolHTTP2, nil
	u.Targets = []Target{
		{ID: tV1, PeerURI: peerOf("api"), Servers: []Server{slot(t, "s1", appServer(t, ca, "v1", peerOf("api")))}},
		{ID: tV2, PeerURI: peerOf("api"), Servers: []Server{slot(t, "s1", appServer(t, ca, "v2", peerOf("api")))}},
	}
	u.Routes = []Route{
		{Match: &chain.Match{Headers: []chain.HeaderMatch{{Name: "x-canary", Present: true}}}, Splits: []Split{{Weight: 10000, Targets: []string{tV2}}}},
		{Splits: []Split{{Weight: 10000, Targets: []string{tV1}}}},
	}
	r := startChain(t, ca, m)
	h2c := &http.Transport{Protocols: new(http.Protocols)}
	h2c.Protocols.SetUnencryptedHTTP2(true)
	r.c = &http.Client{Timeout: 5 * time.Second, Transport: h2c}
	if code, body, _ := r.get("/a", "x-canary", "1"); code != 200 || body != "v2 HTTP/2.0 /a" {
		t.Errorf("h2c with the canary header: %d %q, want v2 reached in h2", code, body)
	}
	if code, body, _ := r.get("/b"); code != 200 || body != "v1 HTTP/2.0 /b" {
		t.Errorf("h2c without it: %d %q, want v1 reached in h2", code, body)
	}
}
