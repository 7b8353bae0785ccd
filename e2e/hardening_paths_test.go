package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// Inbound request spellings: the L7 rules must decide on the path the app
// will serve. Every request here is written by hand on its own mTLS
// connection, so that no client library normalizes it first.

// seenURIApp is an app that answers 200 and tells, in a header, the
// request target it received.
func seenURIApp(t *testing.T) *httptest.Server {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Uri", r.RequestURI)
		fmt.Fprint(w, "ok")
	}))
	t.Cleanup(app.Close)
	return app
}

// rawResponse is what came back for a hand-written request.
type rawResponse struct {
	code int
	body string
	seen string // the request target the app received ("" if it got none)
}

func (r rawResponse) String() string {
	return fmt.Sprintf("%d %q (app saw %q)", r.code, strings.TrimSpace(r.body), r.seen)
}

// sendRaw writes "<method> <target> HTTP/1.1" with a Host header (host,
// or "api" when empty) and the given header lines on a new connection.
func sendRaw(t *testing.T, addr string, cfg *tls.Config, method, target, host string, headers ...string) rawResponse {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if host == "" {
		host = "api"
	}
	req := method + " " + target + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n"
	for _, h := range headers {
		req += h + "\r\n"
	}
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		t.Fatalf("write %q: %v", target, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("read the answer to %s %q: %v", method, target, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return rawResponse{code: resp.StatusCode, body: string(body), seen: resp.Header.Get("X-Seen-Uri")}
}

// inboundUnderTest is an inbound listener and the callers' TLS settings.
type inboundUnderTest struct {
	addr    string
	callers map[string]*tls.Config
	consul  *harness.Consul
}

func (in *inboundUnderTest) send(t *testing.T, caller, method, target, host string, headers ...string) rawResponse {
	t.Helper()
	return sendRaw(t, in.addr, in.callers[caller], method, target, host, headers...)
}

// spelling is one request target and what must become of it: a 403 with
// reason, a 400 (reason ""), or, for code 200, the target the app sees.
type spelling struct {
	target string
	code   int
	want   string // the 403 reason, or the target the app must see
}

// checkPathSpellings runs the cases of issue "L7 paths are matched raw":
// deny PathPrefix /admin, then allow PathPrefix /.
func checkPathSpellings(t *testing.T, in *inboundUnderTest) {
	in.consul.SetIntentions(t, "api",
		&api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/admin"}),
			httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
		}},
		harness.Source("batch", allow))
	harness.WaitFor(t, 10*time.Second, "the L7 intention applied", func() bool {
		return in.send(t, "web", "GET", "/admin", "").code == 403
	})
	const denied = "l7_permission_deny"
	for _, c := range []spelling{
		{"/admin", 403, denied},
		// Rewritten to /admin, then denied.
		{"/%61dmin", 403, denied},
		{"/%61%64%6D%69%6e", 403, denied},
		{"//admin", 403, denied},
		{"/./admin", 403, denied},
		{"/x/../admin", 403, denied},
		{"/x//../admin", 403, denied}, // slashes merged first: x is the segment ".." removes
		{"/../admin", 403, denied},
		{"/%2e%2e/admin", 403, denied},
		{"/x/%2E%2e/admin", 403, denied}, // a decoded dot is a dot
		{"/x/.%2e/admin", 403, denied},
		{"/%2e/admin", 403, denied},
		{"http://api/%61dmin", 403, denied}, // absolute form
		{"/admin?x=1", 403, denied},
		// Refused: no safe rewrite.
		{"/admin%2fx", 400, ""},
		{"/%2Fadmin", 400, ""},
		{"/public/..%2f..%2fadmin", 400, ""},
		{"/%5cadmin", 400, ""},
		{`/\admin`, 400, ""},
		{`/public\..\admin`, 400, ""},
		{"/admin%00", 400, ""},
		{"/x/..;/admin", 400, ""},
		{"/;/admin", 400, ""},
		{"/.;/admin", 400, ""},
		{"/%zz/admin", 400, ""},                             // not an escape
		{"/%%36%31dmin", 400, ""},                           // would decode twice
		{"/a%2/admin", 400, ""},                             // truncated escape
		{"/admin#frag", 400, ""},                            // no fragment in a request
		{"/public/%C0%AEadmin", 200, "/public/%C0%AEadmin"}, // not ASCII: never decoded
		// Allowed, and the app sees exactly the path that was authorized.
		{"/", 200, "/"},
		{"/public/./a/../b?q=%61", 200, "/public/b?q=a"},
		{"/%7Euser/%41", 200, "/~user/A"},
		{"/x/...", 200, "/x/..."},
		// An encoded '%' stays encoded: an app decoding once sees
		// /%61dmin, which is not /admin.
		{"/%2561dmin", 200, "/%2561dmin"},
		// Paths are case-sensitive (RFC 3986; Consul's PathPrefix too):
		// /ADMIN is another path, and the app gets it as it is.
		{"/ADMIN", 200, "/ADMIN"},
		{"/admin;jsessionid=1", 403, denied},
	} {
		got := in.send(t, "web", "GET", c.target, "")
		ok := got.code == c.code
		switch c.code {
		case 403:
			ok = ok && strings.Contains(got.body, "("+c.want+")") && got.seen == ""
		case 400:
			ok = ok && got.seen == ""
		case 200:
			ok = ok && got.seen == c.want
		}
		if !ok {
			t.Errorf("GET %s: got %v; want %d %s", c.target, got, c.code, c.want)
		}
	}
	// The rules run for callers whose intention has HTTP permissions: an
	// L4 caller (batch) is admitted to every path, so nothing is decided
	// on its spelling and its requests reach the app as sent.
	if got := in.send(t, "batch", "GET", "/x/../%61dmin", ""); got.code != 200 || got.seen != "/x/../%61dmin" {
		t.Errorf("batch GET /x/../%%61dmin: got %v, want 200 with the target as sent", got)
	}
	if got := in.send(t, "batch", "GET", "/admin%2f", ""); got.code != 200 || got.seen != "/admin%2f" {
		t.Errorf("batch GET /admin%%2f: got %v, want 200 with the target as sent", got)
	}
}

// checkHeaderSpellings covers header permissions on pseudo-headers and
// header names that differ from a tested one by '_' for '-'.
func checkHeaderSpellings(t *testing.T, in *inboundUnderTest) {
	hdr := func(name string, set func(*api.IntentionHTTPHeaderPermission)) *api.IntentionPermission {
		return httpPerm(deny, api.IntentionHTTPPermission{Header: header(name, set)})
	}
	in.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		hdr("x-role", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "admin" }),
		hdr(":path", func(h *api.IntentionHTTPHeaderPermission) { h.Prefix = "/secret" }),
		hdr(":path", func(h *api.IntentionHTTPHeaderPermission) { h.Regex = `.*[?&]debug=.*` }),
		hdr(":method", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "DELETE" }),
		hdr(":authority", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "evil.example" }),
		hdr(":scheme", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "http" }),
		httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
	}})
	harness.WaitFor(t, 10*time.Second, "the header intention applied", func() bool {
		return in.send(t, "web", "GET", "/", "", "X-Role: admin").code == 403
	})
	for _, c := range []struct {
		method, target, host string
		headers              []string
		reason               string // "" for 200
	}{
		{"GET", "/", "", []string{"X-Role: user"}, ""},
		{"GET", "/", "", []string{"X-Role: admin"}, "l7_permission_deny"},
		{"GET", "/", "", []string{"X_Role: admin"}, "l7_ambiguous_header"},
		{"GET", "/", "", []string{"X-Role: user", "x_role: admin"}, "l7_ambiguous_header"},
		{"GET", "/", "", []string{"X_Other: 1"}, ""},
		{"GET", "/secret/x", "", nil, "l7_permission_deny"},
		{"GET", "/%73ecret", "", nil, "l7_permission_deny"}, // :path is the normalized path
		{"GET", "/x/../secret", "", nil, "l7_permission_deny"},
		{"GET", "/x?secret", "", nil, ""},
		{"GET", "/x?a=1&debug=1", "", nil, "l7_permission_deny"}, // :path keeps the query
		{"DELETE", "/x", "", nil, "l7_permission_deny"},
		{"PUT", "/x", "", nil, ""},
		{"GET", "/", "evil.example", nil, "l7_permission_deny"},
		{"GET", "/", "api.example", nil, ""},
	} {
		got := in.send(t, "web", c.method, c.target, c.host, c.headers...)
		if c.reason == "" && got.code != 200 || c.reason != "" && (got.code != 403 || !strings.Contains(got.body, "("+c.reason+")")) {
			t.Errorf("%s %s host %q %v: got %v, want reason %q", c.method, c.target, c.host, c.headers, got, c.reason)
		}
	}

	// A pseudo-header a request does not have: the rule's meaning is
	// unknown, so the intention's requests are denied, not the rule skipped.
	in.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		hdr(":status", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "200" }),
		httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
	}})
	harness.WaitFor(t, 10*time.Second, "a rule on :status denies every request", func() bool {
		got := in.send(t, "web", "GET", "/", "")
		return got.code == 403 && strings.Contains(got.body, "(l7_invalid_permission)")
	})
}

// TestInboundSpellingsStandalone runs the cases through
// examples/standalone/haproxy.cfg as shipped.
func TestInboundSpellingsStandalone(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetProtocol(t, "api", "http")
	in := &inboundUnderTest{addr: relaunchStandalone(t, s, seenURIApp(t).Listener.Addr().String()), consul: s.consul,
		callers: map[string]*tls.Config{}}
	for _, c := range []string{"web", "batch"} {
		in.callers[c] = harness.ClientTLS(s.leaves[c], s.roots)
	}
	t.Run("paths", func(t *testing.T) { checkPathSpellings(t, in) })
	t.Run("headers", func(t *testing.T) { checkHeaderSpellings(t, in) })
}

// TestInboundSpellingsSidecar runs them through the configuration the
// sidecar renders.
func TestInboundSpellingsSidecar(t *testing.T) {
	m := newMesh(t)
	m.consul.SetProtocol(t, "api", "http")
	app := seenURIApp(t)
	dest := m.register(&instance{id: "api-1"}, "api", "http", app.Listener.Addr().(*net.TCPAddr).Port)
	roots, _ := m.consul.RootsPEM(t)
	in := &inboundUnderTest{addr: fmt.Sprintf("127.0.0.1:%d", dest.port), consul: m.consul, callers: map[string]*tls.Config{}}
	for _, c := range []string{"web", "batch"} {
		in.callers[c] = harness.ClientTLS(m.consul.IssueLeaf(t, c), roots)
	}
	t.Run("paths", func(t *testing.T) { checkPathSpellings(t, in) })
	t.Run("headers", func(t *testing.T) { checkHeaderSpellings(t, in) })
}

// relaunchStandalone starts a second HAProxy with the standalone setup's
// configuration (examples/standalone as the setup wrote it), on new
// listeners, in front of app; edits are old/new pairs applied after. It
// returns the inbound HTTP listener's address.
func relaunchStandalone(t *testing.T, s *standalone, app string, edits ...string) string {
	t.Helper()
	dir := harness.TempDir(t)
	inbound := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	cfg := readFile(t, filepath.Join(s.dir, "haproxy.cfg"))
	cfg = regexp.MustCompile(`(?m)^(\s+server app )\S+`).ReplaceAllString(cfg, "${1}"+app)
	cfg = strings.NewReplacer(append([]string{
		s.inbound, inbound,
		s.tcp, fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t)),
		filepath.Join(s.dir, "admin.sock"), filepath.Join(dir, "admin.sock"),
	}, edits...)...).Replace(cfg)
	harness.StartHAProxy(t, dir, cfg, inbound)
	return inbound
}

// TestRecheckClockSteppedBack: HAProxy 2.6 gives rules only the wall
// clock. A clock stepped back must not extend a decision: the request
// after the step is checked again. The configuration's clock is replaced
// by a request header so that the test can step it.
func TestRecheckClockSteppedBack(t *testing.T) {
	s := startStandalone(t, time.Minute)
	if n := strings.Count(readExample(t, "haproxy.cfg"), "date(0,ms)"); n < 2 {
		t.Fatalf("the example's re-check uses date(0,ms) %d times; this test replaces it", n)
	}
	addr := relaunchStandalone(t, s, seenURIApp(t).Listener.Addr().String(), "date(0,ms)", "req.hdr_val(x-test-clock)")
	s.consul.SetIntentions(t, "api", harness.Source("web", allow))
	harness.WaitFor(t, 5*time.Second, "web allowed", func() bool { code, _ := s.mustGet(t, "web"); return code == 200 })

	conn, err := tls.Dial("tcp", addr, harness.ClientTLS(s.leaves["web"], s.roots))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	k := &keepAlive{conn: conn, r: bufio.NewReader(conn)}
	at := func(ms int) int {
		code, _ := k.do(t, "GET", "/", fmt.Sprintf("X-Test-Clock: %d", ms))
		return code
	}
	const t0 = 1_000_000_000 // the clock at the first check; the ttl is 300ms
	if code := at(t0); code != 200 {
		t.Fatalf("first request: %d", code)
	}
	s.consul.SetIntentions(t, "api", harness.Source("web", deny))
	harness.WaitFor(t, 5*time.Second, "web denied on new connections", func() bool { code, _ := s.mustGet(t, "web"); return code == 403 })
	if code := at(t0 + 100); code != 200 {
		t.Fatalf("100ms later on the clock, within the ttl: %d, want the cached 200", code)
	}
	if code := at(t0 - 60_000); code != 403 {
		t.Fatalf("the clock stepped back a minute: %d, want 403 (the decision checked again)", code)
	}
	// Forward again: the new decision (deny) holds as usual.
	if code := at(t0 + 200); code != 403 {
		t.Fatalf("after the step: %d, want 403", code)
	}
}

// TestInboundRulesSameInExample: the example and the rendered template
// share the normalization and re-check rules line for line.
func TestInboundRulesSameInExample(t *testing.T) {
	tmpl := readRepoFile(t, "plugin", "render", "haproxy.cfg.tmpl")
	example := readExample(t, "haproxy.cfg")
	var n int
	for _, line := range strings.Split(example, "\n") {
		l := strings.TrimSpace(line)
		if strings.HasPrefix(l, "http-request normalize-uri") || strings.Contains(l, "ambiguous path") ||
			strings.Contains(l, "hc_checked") || strings.Contains(l, "sess.hc_expires") || l == "expose-experimental-directives" {
			n++
			if !strings.Contains(tmpl, line) {
				t.Errorf("the template lacks the example's %q", l)
			}
		}
	}
	if n < 11 {
		t.Fatalf("found %d normalization and re-check rules in the example, want 11", n)
	}
}

// TestHeaderRuleReachesOpenConnection: a connection admitted while its
// intention tested no header sends no header block until its next check.
// A header rule added meanwhile must not be skipped on it. The clock is
// frozen (as in TestRecheckClockSteppedBack) so that the connection's
// decision cannot be checked again during the test.
func TestHeaderRuleReachesOpenConnection(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetProtocol(t, "api", "http")
	addr := relaunchStandalone(t, s, seenURIApp(t).Listener.Addr().String(), "date(0,ms)", "req.hdr_val(x-test-clock)")
	cfg := harness.ClientTLS(s.leaves["web"], s.roots)
	const clock = "X-Test-Clock: 1000000000"
	s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
	}})
	harness.WaitFor(t, 5*time.Second, "the path-only intention applied", func() bool {
		return sendRaw(t, addr, cfg, "GET", "/", "", clock).code == 200
	})
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	k := &keepAlive{conn: conn, r: bufio.NewReader(conn)}
	if code, body := k.do(t, "GET", "/", clock, "X-Evil: 1"); code != 200 {
		t.Fatalf("before the header rule: %d %q", code, body)
	}
	s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		httpPerm(deny, api.IntentionHTTPPermission{Header: header("x-evil", func(h *api.IntentionHTTPHeaderPermission) { h.Present = true })}),
		httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
	}})
	harness.WaitFor(t, 5*time.Second, "the header rule applied to new connections", func() bool {
		return sendRaw(t, addr, cfg, "GET", "/", "", clock, "X-Evil: 1").code == 403
	})
	if code, body := k.do(t, "GET", "/", clock, "X-Evil: 1"); code != 403 {
		t.Fatalf("the open connection, with the header the new rule denies: %d %q, want 403", code, body)
	}
}
