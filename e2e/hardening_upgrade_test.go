package e2e

import (
	"bufio"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// wsEcho answers a WebSocket upgrade with 101 and a valid
// Sec-WebSocket-Accept (without it HAProxy answers 502), then echoes the
// bytes of the tunnel; other requests go to next.
func wsEcho(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			next.ServeHTTP(w, r)
			return
		}
		sum := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		c, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n")
		if rw.Flush() == nil {
			_, _ = io.Copy(c, rw)
		}
	})
}

// startWSApp serves wsEcho (plain requests get "plain") and returns its port.
func startWSApp(t *testing.T) int {
	t.Helper()
	app := httptest.NewServer(wsEcho(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "plain")
	})))
	t.Cleanup(app.Close)
	return app.Listener.Addr().(*net.TCPAddr).Port
}

// upgrade asks for a WebSocket on c and returns the answer's status and
// body; on a 101, the upgraded stream (which the test's cleanup closes).
func upgrade(t *testing.T, c net.Conn) (int, string, *stream) { return upgradePath(t, c, "/ws") }

// upgradePath is upgrade with the request's path.
func upgradePath(t *testing.T, c net.Conn, path string) (int, string, *stream) {
	t.Helper()
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"); err != nil {
		return 0, err.Error(), nil
	}
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, &http.Request{Method: "GET"})
	if err != nil {
		return 0, err.Error(), nil
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(body), nil
	}
	return resp.StatusCode, "", &stream{conn: c, r: r}
}

// mustUpgrade opens an upgraded stream on c and checks that it echoes.
func mustUpgrade(t *testing.T, c net.Conn, what string) *stream {
	t.Helper()
	code, body, s := upgrade(t, c)
	if s == nil {
		t.Fatalf("%s: upgrade answered %d %q, want 101", what, code, body)
	}
	if err := s.roundTrip("hello"); err != nil {
		t.Fatalf("%s: the upgraded stream does not echo: %v", what, err)
	}
	return s
}

func dialTLS(t *testing.T, addr string, leaf *harness.Leaf, roots string) net.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, harness.ClientTLS(leaf, roots))
	if err != nil {
		t.Fatalf("mTLS to %s: %v", addr, err)
	}
	return c
}

// tableKeys lists the keys of a stick table that have live streams.
func tableKeys(out string) []string {
	var keys []string
	for _, line := range strings.Split(out, "\n") {
		var key, use string
		for _, w := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(w, "key="); ok {
				key = v
			}
			if v, ok := strings.CutPrefix(w, "use="); ok {
				use = v
			}
		}
		if key != "" && use != "0" {
			keys = append(keys, key)
		}
	}
	return keys
}

// longName is a service name of n characters.
func longName(n int) string { return "long-" + strings.Repeat("s", n-len("long-")) }

// TestUpgradeRevocation: a WebSocket through the mesh is a tunnel no HTTP
// rule sees again; a deny closes the caller's upgraded streams within a
// second, as for TCP streams, and leaves other callers' streams open.
func TestUpgradeRevocation(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	echo := m.register(&instance{id: "echo-1", args: []string{"-metrics-listen", metrics}}, "echo", "http", startWSApp(t))
	web := m.add("web", "web-1", "echo")
	batch := m.add("batch", "batch-1", "echo")
	harness.WaitFor(t, 10*time.Second, "echo through the mesh", func() bool {
		code, body, err := web.call("echo")
		code2, _, err2 := batch.call("echo")
		return err == nil && code == 200 && body == "plain" && err2 == nil && code2 == 200
	})
	dialUpstream := func(in *instance) net.Conn {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", in.upstream["echo"]), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	var took []time.Duration
	for round := 0; round < 3; round++ {
		webStreams := []*stream{mustUpgrade(t, dialUpstream(web), "web"), mustUpgrade(t, dialUpstream(web), "web")}
		batchStream := mustUpgrade(t, dialUpstream(batch), "batch")

		written := time.Now()
		m.consul.SetIntentions(t, "echo", harness.Source("web", deny), harness.Source("batch", allow), harness.Source("*", deny))
		for i, s := range webStreams {
			at := s.closedAt(3 * time.Second)
			if at.IsZero() {
				t.Fatalf("round %d: web's upgraded stream %d is still open 3s after the deny", round, i)
			}
			took = append(took, at.Sub(written))
		}
		if err := batchStream.roundTrip("still here"); err != nil {
			t.Fatalf("round %d: batch's upgraded stream was cut too: %v", round, err)
		}
		if code, body, s := upgrade(t, dialUpstream(web)); s != nil || code != 403 {
			t.Fatalf("round %d: a new upgrade from web got %d %q after the deny, want 403", round, code, body)
		}
		m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
		// Allowed again for upgrades too: a plain call may pass on a
		// connection checked a moment later than a new upgrade's.
		harness.WaitFor(t, 5*time.Second, "web allowed again", func() bool {
			code, _, err := web.call("echo")
			if err != nil || code != 200 {
				return false
			}
			_, _, s := upgrade(t, dialUpstream(web))
			if s != nil {
				s.conn.Close()
			}
			return s != nil
		})
	}
	var worst time.Duration
	for _, d := range took {
		worst = max(worst, d)
	}
	t.Logf("upgraded streams closed after the deny: %v (worst %v)", took, worst)
	if worst > time.Second {
		t.Errorf("an upgraded stream took %v to close, want <= 1s", worst)
	}
	fam := scrape(t, metrics)["haconnect_revoked_connections_total"]
	if got := find(fam, map[string]string{"reason": "intention_deny"}); got.GetCounter().GetValue() != float64(len(took)) {
		t.Errorf("haconnect_revoked_connections_total{reason=intention_deny} = %v, want %d", got.GetCounter().GetValue(), len(took))
	}

	roots, _ := m.consul.RootsPEM(t)
	inbound := fmt.Sprintf("127.0.0.1:%d", echo.port)

	t.Run("HTTP permissions: the upgrade request is checked, and its tunnel closed on a change", func(t *testing.T) {
		// The upgrade request is checked against the caller's HTTP
		// permissions like any request. The tunnel that follows carries
		// no request that could be checked again, so when the
		// destination's intentions change it is closed (l7_intention_not_http),
		// even by a change that keeps the caller allowed: the caller
		// reconnects and its new upgrade request is checked.
		m.consul.SetProtocol(t, "echo", "http")
		wsOnly := func(extra ...*api.SourceIntention) {
			m.consul.SetIntentions(t, "echo", append([]*api.SourceIntention{{Name: "web", Permissions: []*api.IntentionPermission{
				httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/ws"}),
				httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/"})}},
				harness.Source("batch", allow), harness.Source("*", deny)}, extra...)...)
		}
		wsOnly()
		harness.WaitFor(t, 5*time.Second, "web's HTTP permissions", func() bool {
			code, _, err := web.callPath("echo", "/other")
			return err == nil && code == 403
		})
		if code, body, s := upgradePath(t, dialUpstream(web), "/other"); s != nil || code != 403 {
			t.Fatalf("an upgrade outside web's permissions got %d %q, want 403", code, body)
		}
		s := mustUpgrade(t, dialUpstream(web), "web within its permissions")
		before := find(scrape(t, metrics)["haconnect_revoked_connections_total"], map[string]string{"reason": "l7_intention_not_http"}).GetCounter().GetValue()
		wsOnly(harness.Source("other", allow))
		if s.closedAt(3 * time.Second).IsZero() {
			t.Fatal("web's tunnel survived a change it can no longer be checked against")
		}
		// The revoker counts a stream once HAProxy has shut it down: the
		// count may follow the close by a moment.
		var got float64
		harness.WaitFor(t, 2*time.Second, "the revocation counted", func() bool {
			got = find(scrape(t, metrics)["haconnect_revoked_connections_total"], map[string]string{"reason": "l7_intention_not_http"}).GetCounter().GetValue()
			return got >= before+1
		})
		if got != before+1 {
			t.Errorf("haconnect_revoked_connections_total{reason=l7_intention_not_http} = %v, want %v", got, before+1)
		}
		mustUpgrade(t, dialUpstream(web), "web reconnecting")
		m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
	})

	t.Run("a long SPIFFE ID is tracked whole and revoked for itself", func(t *testing.T) {
		// 256 characters, the longest ACL service identity: the key is
		// longer than the 256 bytes the table once held. Cut, it named
		// another service (a prefix of this one), which no intention
		// denies.
		name := longName(256)
		leaf := m.consul.IssueLeaf(t, name)
		m.consul.SetIntentions(t, "echo", harness.Source(name, allow), harness.Source("web", allow), harness.Source("*", deny))
		s := mustUpgrade(t, dialTLS(t, inbound, leaf, roots), "the long identity")
		keys := tableKeys(echo.admin(t, "show table haconnect_conns"))
		if n := len(slices.DeleteFunc(slices.Clone(keys), func(k string) bool { return !strings.HasSuffix(k, "|"+leaf.URI) })); n != 1 {
			t.Fatalf("tracked %q, want one key ending in |%s (%d bytes)", keys, leaf.URI, len(leaf.URI))
		}
		written := time.Now()
		m.consul.SetIntentions(t, "echo", harness.Source(name, deny), harness.Source("web", allow), harness.Source("*", deny))
		at := s.closedAt(3 * time.Second)
		if at.IsZero() {
			t.Fatal("the long identity's upgraded stream is still open 3s after the deny")
		}
		if at.Sub(written) > time.Second {
			t.Errorf("closed after %v, want <= 1s", at.Sub(written))
		}
	})

	t.Run("an identity too long to track is refused and counted", func(t *testing.T) {
		name := longName(520) // the key passes the table's 566 bytes
		leaf := m.consul.IssueLeaf(t, name)
		m.consul.SetIntentions(t, "echo", harness.Source(name, allow), harness.Source("web", allow), harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "the long identity allowed", func() bool {
			code, _, err := getOnce(harness.ClientTLS(leaf, roots), "https://"+inbound+"/", 5*time.Second)
			return err == nil && code == 200
		})
		code, body, s := upgrade(t, dialTLS(t, inbound, leaf, roots))
		if s != nil || code != 503 || !strings.Contains(body, "key_too_long") {
			t.Fatalf("upgrade answered %d %q, want 503 naming key_too_long", code, body)
		}
		fam := scrape(t, metrics)["haconnect_untracked_connections_total"]
		if got := find(fam, map[string]string{"reason": "key_too_long"}); got.GetCounter().GetValue() != 1 {
			t.Errorf("haconnect_untracked_connections_total{reason=key_too_long} = %v, want 1", got.GetCounter().GetValue())
		}
		// HAProxy's log line reaches the sidecar's output through its
		// stderr, a moment after the answer.
		logged := func() bool { return strings.Contains(echo.sidecar.Output(), "could not be tracked for revocation") }
		for deadline := time.Now().Add(3 * time.Second); !logged() && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		if !logged() {
			t.Errorf("the refused stream is not logged:\n%s", echo.sidecar.Output())
		}
	})
}

// TestStandaloneUpgradeRevocation: the example configuration as shipped,
// with haconnect-spoa -revoke-socket and its default -revoke-frontend,
// closes a revoked caller's upgraded streams on the HTTP listener (an
// HTTP/1.1 upgrade, and a WebSocket over HTTP/2) and its connections on
// the TCP listener, and nobody else's.
func TestStandaloneUpgradeRevocation(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("batch", allow))
	web := mustUpgrade(t, dialTLS(t, s.inbound, s.leaves["web"], s.roots), "web")
	webTCP := echoStream(t, dialTLS(t, s.tcp, s.leaves["web"], s.roots), "web over TCP")
	webH2 := openH2Tunnel(t, dialTLS(t, s.inbound, s.leaves["web"], s.roots))
	batch := mustUpgrade(t, dialTLS(t, s.inbound, s.leaves["batch"], s.roots), "batch")
	batchH2 := openH2Tunnel(t, dialTLS(t, s.inbound, s.leaves["batch"], s.roots))

	written := time.Now()
	s.consul.SetIntentions(t, "api", harness.Source("web", deny), harness.Source("batch", allow))
	for what, st := range map[string]tunnel{"upgraded stream": web, "TCP stream": webTCP, "HTTP/2 tunnel": webH2} {
		at := st.closedAt(3 * time.Second)
		if at.IsZero() {
			t.Fatalf("web's %s is still open 3s after the deny", what)
		}
		t.Logf("web's %s closed %v after the deny", what, at.Sub(written))
		if at.Sub(written) > time.Second {
			t.Errorf("web's %s closed after %v, want <= 1s", what, at.Sub(written))
		}
	}
	if err := batch.roundTrip("still here"); err != nil {
		t.Fatalf("batch's upgraded stream was cut too: %v", err)
	}
	if err := batchH2.roundTrip("still here"); err != nil {
		t.Fatalf("batch's HTTP/2 tunnel was cut too: %v", err)
	}
	if got := s.metric(t, "haconnect_revoked_connections_total", map[string]string{"reason": "intention_deny"}); got != 3 {
		t.Errorf("haconnect_revoked_connections_total{reason=intention_deny} = %v, want 3", got)
	}
}

// TestStandaloneUntracked: the example's table holds an IPv6 source with a
// long SPIFFE ID whole (and an IPv4 one on the TCP listener), and what it
// cannot track (a longer key, or a full table) is refused on both
// listeners and counted. The table is made small (size 3) so that it
// fills; the rules are the example's.
func TestStandaloneUntracked(t *testing.T) {
	s := startStandalone(t, time.Minute)
	long := longName(256)
	tooLong := longName(540)
	leaves := map[string]*harness.Leaf{}
	for _, name := range []string{long, tooLong} {
		leaves[name] = s.consul.IssueLeaf(t, name)
	}
	s.consul.SetIntentions(t, "api", harness.Source(long, allow), harness.Source("*", allow))

	// The same HAProxy, with an IPv6 bind on the HTTP listener and a
	// smaller table.
	v6port := harness.FreePort(t)
	cfg := readFile(t, filepath.Join(s.dir, "haproxy.cfg"))
	var bind string
	for _, line := range strings.Split(cfg, "\n") {
		if strings.HasPrefix(line, "    bind "+s.inbound+" ssl ") {
			bind = line
		}
	}
	table := regexp.MustCompile(`(?m)^backend haconnect_conns\n    stick-table type string len \d+ size 100k `)
	if bind == "" || len(table.FindAllString(cfg, -1)) != 1 {
		t.Fatalf("the example changed shape:\n%s", cfg)
	}
	cfg = strings.Replace(cfg, bind, bind+"\n"+strings.Replace(bind, s.inbound, fmt.Sprintf("ipv6@::1:%d", v6port), 1), 1)
	cfg = table.ReplaceAllStringFunc(cfg, func(m string) string { return strings.Replace(m, "size 100k", "size 3", 1) })
	s.haproxy.Proc.Kill()
	v6 := fmt.Sprintf("[::1]:%d", v6port)
	s.haproxy = harness.StartHAProxy(t, s.dir, cfg, s.inbound, s.tcp, v6)
	admin := haproxy.NewAdmin(filepath.Join(s.dir, "admin.sock"))
	harness.WaitFor(t, 10*time.Second, "HAProxy's admin socket", func() bool {
		_, err := admin.Command("show info")
		return err == nil
	})
	conns := func() []string {
		out, err := admin.Command("show table haconnect_conns")
		if err != nil {
			t.Fatal(err)
		}
		return tableKeys(out)
	}

	longTCP := echoStream(t, dialTLS(t, s.tcp, leaves[long], s.roots), "the long identity over TCP")
	keys := conns()
	if len(keys) != 1 || !strings.HasSuffix(keys[0], "|"+leaves[long].URI) {
		t.Fatalf("tracked %q, want one key \"127.0.0.1:<port>|%s\" (%d bytes)", keys, leaves[long].URI, len(leaves[long].URI))
	}
	longStream := mustUpgrade(t, dialTLS(t, v6, leaves[long], s.roots), "the long identity over IPv6")
	keys = conns()
	if len(keys) != 2 || !slices.ContainsFunc(keys, func(k string) bool {
		return strings.HasPrefix(k, "::1:") && strings.HasSuffix(k, "|"+leaves[long].URI)
	}) {
		t.Fatalf("tracked %q, want a key \"::1:<port>|%s\" (%d bytes) too", keys, leaves[long].URI, len(leaves[long].URI))
	}
	t.Logf("tracked whole: keys of %d and %d bytes", len(keys[0]), len(keys[1]))
	web := mustUpgrade(t, dialTLS(t, s.inbound, s.leaves["web"], s.roots), "web")

	t.Run("a key longer than the table's is refused on both listeners", func(t *testing.T) {
		code, body, st := upgrade(t, dialTLS(t, s.inbound, leaves[tooLong], s.roots))
		if st != nil || code != 503 || !strings.Contains(body, "key_too_long") {
			t.Fatalf("upgrade answered %d %q, want 503 naming key_too_long", code, body)
		}
		if got, err := echoOnce(dialTLS(t, s.tcp, leaves[tooLong], s.roots)); err == nil {
			t.Fatalf("the TCP listener echoed %q for an identity it cannot track", got)
		}
		if got := s.metric(t, "haconnect_untracked_connections_total", map[string]string{"reason": "key_too_long"}); got != 2 {
			t.Errorf("haconnect_untracked_connections_total{reason=key_too_long} = %v, want 2", got)
		}
	})

	t.Run("a full table refuses new streams on both listeners", func(t *testing.T) {
		code, body, st := upgrade(t, dialTLS(t, s.inbound, s.leaves["batch"], s.roots))
		if st != nil || code != 503 || !strings.Contains(body, "table_full") {
			t.Fatalf("upgrade answered %d %q, want 503 naming table_full", code, body)
		}
		if got, err := echoOnce(dialTLS(t, s.tcp, s.leaves["batch"], s.roots)); err == nil {
			t.Fatalf("the TCP listener echoed %q with its table full", got)
		}
		if got := s.metric(t, "haconnect_untracked_connections_total", map[string]string{"reason": "table_full"}); got != 2 {
			t.Errorf("haconnect_untracked_connections_total{reason=table_full} = %v, want 2", got)
		}
		if code, _ := s.mustGet(t, "batch"); code != 200 {
			t.Errorf("a plain request (nothing to track) got %d, want 200", code)
		}
	})

	t.Run("the long identity is revoked for itself, and its entry is reused", func(t *testing.T) {
		written := time.Now()
		s.consul.SetIntentions(t, "api", harness.Source(long, deny), harness.Source("*", allow))
		for what, st := range map[string]*stream{"upgraded stream": longStream, "TCP stream": longTCP} {
			at := st.closedAt(3 * time.Second)
			if at.IsZero() {
				t.Fatalf("the long identity's %s is still open 3s after the deny", what)
			}
			if at.Sub(written) > time.Second {
				t.Errorf("the long identity's %s closed after %v, want <= 1s", what, at.Sub(written))
			}
		}
		if err := web.roundTrip("still here"); err != nil {
			t.Fatalf("web's stream was cut too: %v", err)
		}
		harness.WaitFor(t, 5*time.Second, "a free entry", func() bool { return len(conns()) == 1 })
		mustUpgrade(t, dialTLS(t, s.inbound, s.leaves["batch"], s.roots), "batch, once an entry is free")
	})
	if out := s.spoa.Output(); !strings.Contains(out, "could not be tracked for revocation") {
		t.Errorf("the refused streams are not logged:\n%s", out)
	}
}

// echoOnce sends a line on c and reads the echo (an error when refused).
func echoOnce(c net.Conn) (string, error) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// h2Tunnel is a WebSocket over HTTP/2 (RFC 8441's extended CONNECT) on
// stream 1 of a connection, spoken by hand: the test needs only a few
// frames, and HPACK literals without indexing to send headers.
type h2Tunnel struct {
	c   net.Conn
	r   *bufio.Reader
	buf string // echoed bytes not read yet
}

const (
	h2Data, h2Headers, h2RST, h2Settings, h2Ping, h2GoAway = 0, 1, 3, 4, 6, 7
	h2EndStream, h2EndHeaders, h2Ack                       = 1, 4, 1
)

func (h *h2Tunnel) writeFrame(typ, flags byte, stream uint32, payload []byte) error {
	hdr := []byte{byte(len(payload) >> 16), byte(len(payload) >> 8), byte(len(payload)), typ, flags,
		byte(stream >> 24), byte(stream >> 16), byte(stream >> 8), byte(stream)}
	_, err := h.c.Write(append(hdr, payload...))
	return err
}

func (h *h2Tunnel) readFrame() (typ, flags byte, stream uint32, payload []byte, err error) {
	hdr := make([]byte, 9)
	if _, err = io.ReadFull(h.r, hdr); err != nil {
		return
	}
	payload = make([]byte, int(hdr[0])<<16|int(hdr[1])<<8|int(hdr[2]))
	if _, err = io.ReadFull(h.r, payload); err != nil {
		return
	}
	return hdr[3], hdr[4], uint32(hdr[5]&0x7f)<<24 | uint32(hdr[6])<<16 | uint32(hdr[7])<<8 | uint32(hdr[8]), payload, nil
}

// openH2Tunnel speaks HTTP/2 with prior knowledge on c (no ALPN: the
// inbound listener offers none, and HAProxy still accepts the preface),
// asks for a WebSocket and waits for the 200 that HTTP/2 gives for a 101.
func openH2Tunnel(t *testing.T, c net.Conn) *h2Tunnel {
	t.Helper()
	t.Cleanup(func() { c.Close() })
	h := &h2Tunnel{c: c, r: bufio.NewReader(c)}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := h.writeFrame(h2Settings, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	var block []byte
	for _, f := range [][2]string{{":method", "CONNECT"}, {":protocol", "websocket"}, {":scheme", "https"},
		{":path", "/ws"}, {":authority", "api"}, {"sec-websocket-version", "13"}} {
		block = append(block, 0, byte(len(f[0])))
		block = append(block, f[0]...)
		block = append(block, byte(len(f[1])))
		block = append(block, f[1]...)
	}
	connectProtocol := false
	for {
		typ, flags, stream, payload, err := h.readFrame()
		if err != nil {
			t.Fatalf("HTTP/2 tunnel: %v", err)
		}
		switch {
		case typ == h2Settings && flags&h2Ack == 0:
			for i := 0; i+6 <= len(payload); i += 6 {
				// SETTINGS_ENABLE_CONNECT_PROTOCOL (8) = 1
				connectProtocol = connectProtocol || payload[i] == 0 && payload[i+1] == 8 && payload[i+5] == 1
			}
			if !connectProtocol {
				t.Fatalf("HAProxy does not offer the extended CONNECT (settings %x)", payload)
			}
			if err := h.writeFrame(h2Settings, h2Ack, 0, nil); err != nil {
				t.Fatal(err)
			}
			if err := h.writeFrame(h2Headers, h2EndHeaders, 1, block); err != nil {
				t.Fatal(err)
			}
		case typ == h2Headers && stream == 1:
			// HAProxy encodes ":status 200" as the static table's entry 8.
			if len(payload) == 0 || payload[0] != 0x88 {
				t.Fatalf("extended CONNECT answered header block %x, want :status 200 (88...)", payload)
			}
			if err := h.roundTrip("hello"); err != nil {
				t.Fatalf("the HTTP/2 tunnel does not echo: %v", err)
			}
			return h
		case typ == h2RST || typ == h2GoAway:
			t.Fatalf("HTTP/2 tunnel refused: frame type %d %x", typ, payload)
		}
	}
}

// roundTrip sends a line on stream 1 and reads it back.
func (h *h2Tunnel) roundTrip(line string) error {
	_ = h.c.SetDeadline(time.Now().Add(3 * time.Second))
	if err := h.writeFrame(h2Data, 0, 1, []byte(line+"\n")); err != nil {
		return err
	}
	for !strings.Contains(h.buf, "\n") {
		typ, _, stream, payload, err := h.readFrame()
		if err != nil {
			return err
		}
		switch {
		case typ == h2Data && stream == 1:
			h.buf += string(payload)
		case typ == h2RST && stream == 1 || typ == h2GoAway:
			return fmt.Errorf("stream ended (frame type %d)", typ)
		case typ == h2Ping && len(payload) == 8:
			_ = h.writeFrame(h2Ping, h2Ack, 0, payload)
		}
	}
	got, rest, _ := strings.Cut(h.buf, "\n")
	h.buf = rest
	if got != line {
		return fmt.Errorf("echoed %q, want %q", got, line)
	}
	return nil
}

// closedAt waits (at most limit) for stream 1 or the connection to end and
// returns when it did; the zero time if it stayed open.
func (h *h2Tunnel) closedAt(limit time.Duration) time.Time {
	_ = h.c.SetReadDeadline(time.Now().Add(limit))
	for {
		typ, flags, stream, _, err := h.readFrame()
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return time.Time{}
		}
		if err != nil || typ == h2RST && stream == 1 || typ == h2GoAway ||
			typ == h2Data && stream == 1 && flags&h2EndStream != 0 {
			return time.Now()
		}
	}
}

// tunnel is an upgraded stream over HTTP/1.1 or HTTP/2, or a TCP stream.
type tunnel interface {
	roundTrip(line string) error
	closedAt(limit time.Duration) time.Time
}
