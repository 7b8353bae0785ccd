package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
)

// TestStandaloneStripsIdentityHeaders: with the example as shipped, a
// caller's own identity headers never reach the app, whatever their
// spelling; the app sees the identity the SPOA vouched for, once.
func TestStandaloneStripsIdentityHeaders(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	web := s.leaves["web"]
	forged := "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/admin"
	ka := s.dialKeepAlive(t, "web")
	code, body := ka.do(t, "GET", "/headers",
		"X-Haconnect-Source: admin",
		"X-Haconnect-Spiffe: "+forged,
		"X-Haconnect-Destination: admin",
		"X-Haconnect-Role: root",
		"X-Forwarded-Client-Cert: By="+forged+";URI="+forged,
		"x_haconnect_spiffe: "+forged,
		"X-haconnect_source: admin",
		"x_forwarded_client_cert: URI="+forged,
	)
	if code != 200 {
		t.Fatalf("GET /headers as web: %d %q", code, body)
	}
	hdr, err := textproto.NewReader(bufio.NewReader(strings.NewReader(body + "\r\n"))).ReadMIMEHeader()
	if err != nil {
		t.Fatalf("app's header dump %q: %v", body, err)
	}
	sum := sha256.Sum256(web.TLS.Certificate[0])
	want := map[string][]string{
		"x-haconnect-source":      {"web"},
		"x-haconnect-spiffe":      {web.URI},
		"x-haconnect-destination": {"api"},
		"x-forwarded-client-cert": {"Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + web.URI},
	}
	for name, values := range hdr {
		lower := strings.ToLower(name)
		if !strings.Contains(lower, "haconnect") && !strings.Contains(lower, "client") {
			continue
		}
		if w, ok := want[lower]; !ok || !slices.Equal(values, w) {
			t.Errorf("the app saw %s: %q; want %q", name, values, w)
		}
		delete(want, lower)
	}
	for name, w := range want {
		t.Errorf("the app did not see %s (want %q)", name, w)
	}
	if strings.Contains(body, forged) {
		t.Errorf("the forged SPIFFE ID reached the app:\n%s", body)
	}
}

// TestStandaloneTargetIsTheSPOAs: the example names no destination in its
// SPOE messages, so the SPOA's -target decides; a message naming another
// destination is denied by the SPOA (target_mismatch) and counted.
func TestStandaloneTargetIsTheSPOAs(t *testing.T) {
	for _, f := range []string{"spoe.conf", "spoe-tcp.conf"} {
		for _, line := range strings.Split(readExample(t, f), "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "args ") && strings.Contains(line, "target=") {
				t.Errorf("examples/standalone/%s names a target (%q): it would override the SPOA's -target", f, line)
			}
		}
	}
	s := startStandalone(t, time.Minute)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	s.consul.SetIntentions(t, "db", harness.Source("web", allow))
	if code, _ := s.mustGet(t, "web"); code != 200 {
		t.Fatalf("web -> api: %d", code)
	}
	// An SPOE message as a copied spoe.conf for db would send it.
	c, err := spoptest.Dial("unix", s.spoaAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	vars, err := c.Notify(spoa.MessageName,
		spoptest.ArgValue{Name: spoa.ArgCert, Value: s.leaves["web"].TLS.Certificate[0]},
		spoptest.ArgValue{Name: spoa.ArgTarget, Value: "db"})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vars {
		if v.Name == spoa.VarAuth && v.Value.Bool || v.Name == spoa.VarReason && string(v.Value.Bytes) != "target_mismatch" {
			t.Fatalf("a message for db to the SPOA of api: %+v, want a target_mismatch denial", vars)
		}
	}
	if n := s.metric(t, "haconnect_spoa_target_mismatch_total", nil); n != 1 {
		t.Fatalf("target_mismatch_total = %v, want 1", n)
	}
	if !strings.Contains(s.spoa.Output(), "does not authorize for") {
		t.Fatal("no log line for the mismatch")
	}
}

// TestStandaloneLongHeaderBlock: HAProxy with tune.bufsize 65536 offers a
// max-frame-size of 65532, more than the SPOA accepts (16380 by default).
// A request whose header block outgrows the SPOA's size must fail alone,
// cleanly, instead of closing the SPOP connection under every check in
// flight on it; raised on both sides, it is checked.
func TestStandaloneLongHeaderBlock(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetProtocol(t, "api", "http")
	s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
		httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/", Header: header("x-evil", func(h *api.IntentionHTTPHeaderPermission) { h.Present = true })}),
		httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
	}}, harness.Source("batch", allow), harness.Source("*", deny))
	shippedCfg := readFile(t, filepath.Join(s.dir, "haproxy.cfg"))
	shippedSPOE := readFile(t, filepath.Join(s.dir, "spoe.conf"))
	baseArgs := slices.Clone(s.spoaArgs)

	// restart runs HAProxy (with tune.bufsize 65536) and the SPOA again
	// with the given configuration.
	restart := func(t *testing.T, cfg, spoe string, spoaArgs ...string) {
		t.Helper()
		s.haproxy.Proc.Kill()
		s.spoa.Kill()
		s.spoaArgs = append(slices.Clone(baseArgs), spoaArgs...)
		s.startSPOA(t)
		harness.WriteFile(t, s.dir, "spoe.conf", spoe)
		s.haproxy = harness.StartHAProxy(t, s.dir, strings.Replace(cfg, "global\n", "global\n    tune.bufsize 65536\n", 1), s.inbound, s.tcp)
		harness.WaitFor(t, 10*time.Second, "batch allowed", func() bool {
			code, _ := s.mustGet(t, "batch")
			return code == 200
		})
	}
	big := "X-Big: " + strings.Repeat("a", 20000)
	// check sends long requests among others; isolated: the other checks
	// in flight must all succeed.
	check := func(t *testing.T, wantBig int, wantReason string, isolated bool) {
		t.Helper()
		ka := s.dialKeepAlive(t, "web")
		other := s.dialKeepAlive(t, "web")
		for _, k := range []*keepAlive{ka, other} { // no answer fails the test, not hangs it
			_ = k.conn.SetDeadline(time.Now().Add(30 * time.Second))
		}
		if code, _ := ka.do(t, "GET", "/"); code != 200 {
			t.Fatalf("before the long header block: %d", code)
		}
		// Checks of other connections are in flight on the SPOP
		// connections while the long one is sent.
		stop := make(chan struct{})
		errs := make(chan string, 1)
		go func() {
			defer close(errs)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if code, body := s.mustGet(t, "batch"); code != 200 && isolated {
					errs <- fmt.Sprintf("another caller during the long requests: %d %q", code, body)
					return
				}
			}
		}()
		for i := 0; i < 5; i++ {
			code, body := ka.do(t, "GET", "/", big)
			if code != wantBig || !strings.Contains(body, wantReason) {
				t.Errorf("request with a 20 KB header: %d %q, want %d %s", code, body, wantBig, wantReason)
			}
			if code, body := other.do(t, "GET", "/", "X-Small: 1"); code != 200 && isolated {
				t.Errorf("another request of the same caller: %d %q", code, body)
			}
			if code, body := other.do(t, "GET", "/", "X-Evil: 1"); code != 403 || isolated && !strings.Contains(body, "l7_permission_deny") {
				t.Errorf("a request its intention denies: %d %q", code, body)
			}
			time.Sleep(100 * time.Millisecond)
		}
		close(stop)
		for e := range errs {
			t.Error(e)
		}
		if code, _ := ka.do(t, "GET", "/"); code != 200 {
			t.Fatalf("after the long header blocks, on the same connection: %d", code)
		}
		if n := s.metric(t, "haconnect_spoa_frames_rejected_total", nil); n != 0 {
			t.Fatalf("the SPOA closed %v SPOP connections (frames_rejected_total), want 0", n)
		}
	}

	t.Run("an older spoe.conf: the SPOA's HELLO sets the size, the long request fails alone", func(t *testing.T) {
		// No max-frame-size in spoe.conf and no size rule in haproxy.cfg:
		// only the size the SPOA answers keeps HAProxy from sending the
		// long frame, and the SPOA never closes a connection. (HAProxy
		// 2.6 itself may still drop its SPOE connection when it planned a
		// frame larger than the size the SPOA answered: the checks in
		// flight on it fail closed. The shipped spoe.conf's
		// max-frame-size prevents that; see the next case. -ttl 1h: one
		// connection-level check per connection, see the size rule's
		// comment in haproxy.cfg.)
		var cfg []string
		for _, line := range strings.Split(shippedCfg, "\n") {
			if !strings.Contains(line, "hc_l7size") {
				cfg = append(cfg, line)
			}
		}
		var spoe []string
		for _, line := range strings.Split(shippedSPOE, "\n") {
			if !strings.Contains(line, "max-frame-size") {
				spoe = append(spoe, line)
			}
		}
		restart(t, strings.Join(cfg, "\n"), strings.Join(spoe, "\n"), "-ttl", "1h")
		check(t, 403, "authorization_unavailable", false)
	})
	t.Run("the example as shipped: the long request is denied before any check", func(t *testing.T) {
		restart(t, shippedCfg, shippedSPOE)
		check(t, 403, "l7_request_too_large", true)
	})
	t.Run("sizes raised on both sides: the long request is checked", func(t *testing.T) {
		restart(t, strings.ReplaceAll(shippedCfg, "16380", "65532"), strings.ReplaceAll(shippedSPOE, "16380", "65532"),
			"-max-frame-size", "65532")
		check(t, 200, "", true)
	})
}

// tlsSPOA is the example's HAProxy talking to the SPOA over TCP with
// mutual TLS, as its commented server line says.
type tlsSPOA struct {
	*standalone
	spoaCA, clientCA *harness.ForeignCA
	spoaTCP          string
	app              string
}

func startTLSStandalone(t *testing.T) *tlsSPOA {
	t.Helper()
	consul := harness.StartConsul(t)
	s := &tlsSPOA{standalone: &standalone{dir: harness.TempDir(t), leaves: map[string]*harness.Leaf{}, consul: consul},
		spoaCA: harness.NewForeignCA(t), clientCA: harness.NewForeignCA(t)}
	s.roots, _ = consul.RootsPEM(t)
	for _, svc := range []string{"api", "web", "batch"} {
		s.leaves[svc] = consul.IssueLeaf(t, svc)
	}
	harness.WriteFile(t, s.dir, "leaf.pem", s.leaves["api"].CertPEM+s.leaves["api"].KeyPEM)
	harness.WriteFile(t, s.dir, "roots.pem", s.roots)
	server := s.spoaCA.IssueHost(t, "haconnect-spoa", "haconnect-spoa")
	harness.WriteFile(t, s.dir, "spoa.pem", server.CertPEM)
	harness.WriteFile(t, s.dir, "spoa.key", server.KeyPEM)
	harness.WriteFile(t, s.dir, "haproxy-ca.pem", s.clientCA.CertPEM)
	harness.WriteFile(t, s.dir, "spoa-ca.pem", s.spoaCA.CertPEM)
	client := s.clientCA.IssueHost(t, "haproxy")
	harness.WriteFile(t, s.dir, "spoa-client.pem", client.CertPEM+client.KeyPEM)

	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "source=%s", r.Header.Get("X-Haconnect-Source"))
	}))
	t.Cleanup(app.Close)
	s.app = strings.TrimPrefix(app.URL, "http://")
	s.spoaTCP = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	s.metrics = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	s.spoaArgs = append([]string{"-listen", s.spoaTCP, "-target", "api", "-metrics-listen", s.metrics,
		"-tls-cert", filepath.Join(s.dir, "spoa.pem"), "-tls-key", filepath.Join(s.dir, "spoa.key"),
		"-tls-client-ca", filepath.Join(s.dir, "haproxy-ca.pem")}, consul.Flags(consul.Addr, "")...)
	s.spoa = harness.Start(t, "haconnect-spoa", harness.Binary(t, "haconnect-spoa"), s.spoaArgs...)
	harness.WaitListening(t, s.spoaTCP, 10*time.Second)
	s.haproxy = s.startHAProxy(t, "")
	return s
}

// startHAProxy runs the example with its mutual TLS server line in place
// of the unix socket; clientPEM replaces HAProxy's client certificate
// ("": the one haproxy-ca.pem signed). It sets s.inbound.
func (s *tlsSPOA) startHAProxy(t *testing.T, clientPEM string) *harness.HAProxy {
	t.Helper()
	example := readExample(t, "haproxy.cfg")
	var tlsLine string
	for _, line := range strings.Split(example, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "# server spoa1 "); ok && strings.Contains(rest, " ssl ") {
			tlsLine = "    server spoa1 " + rest
		}
	}
	if tlsLine == "" || !strings.Contains(tlsLine, "verify required") {
		t.Fatalf("the example has no mutual TLS server line for the SPOA: %q", tlsLine)
	}
	dir := s.dir
	if clientPEM != "" {
		dir = harness.TempDir(t)
		for _, f := range []string{"leaf.pem", "roots.pem", "spoa-ca.pem"} {
			harness.WriteFile(t, dir, f, readFile(t, filepath.Join(s.dir, f)))
		}
		harness.WriteFile(t, dir, "spoa-client.pem", clientPEM)
	}
	s.inbound = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	s.tcp = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	example = strings.Replace(example, "    server spoa1 unix@/run/haconnect/spoa.sock",
		strings.Replace(tlsLine, "10.0.0.5:12345", s.spoaTCP, 1), 1)
	cfg := strings.NewReplacer(
		"/etc/haproxy/haconnect", dir,
		"127.0.0.1:21000", s.inbound,
		"127.0.0.1:21001", s.tcp,
		"127.0.0.1:9000", fmt.Sprintf("127.0.0.1:%d", startEcho(t)),
		"127.0.0.1:8080", s.app,
	).Replace(example)
	for _, f := range []string{"spoe.conf", "spoe-tcp.conf"} {
		harness.WriteFile(t, dir, f, readExample(t, f))
	}
	return harness.StartHAProxy(t, dir, cfg, s.inbound, s.tcp)
}

// TestStandaloneSPOAOverMutualTLS: HAProxy and the SPOA on TCP with mutual
// TLS, as the example documents. HAProxy's own certificate gets answers; a
// HAProxy with a certificate of another CA gets none (fail closed); and an
// impostor listening in the SPOA's place while it is down is not believed.
func TestStandaloneSPOAOverMutualTLS(t *testing.T) {
	s := startTLSStandalone(t)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	if code, body := s.mustGet(t, "web"); code != 200 || body != "source=web" {
		t.Fatalf("web through HAProxy with the SPOA over mutual TLS: %d %q, want 200 source=web", code, body)
	}
	if code, body := s.mustGet(t, "batch"); code != 403 || !strings.Contains(body, "intention_deny") {
		t.Fatalf("batch: %d %q, want 403 intention_deny", code, body)
	}

	t.Run("clients without a certificate or of another CA get no SPOP answer", func(t *testing.T) {
		if c, err := spoptest.Dial("tcp", s.spoaTCP, 3*time.Second); err == nil {
			c.Close()
			t.Fatal("plain TCP client answered")
		}
		before := s.metric(t, "haconnect_spoa_frames_rejected_total", map[string]string{"reason": spop.RejectTLS})
		stranger := harness.NewForeignCA(t).IssueHost(t, "haproxy")
		good := s.inbound
		h := s.startHAProxy(t, stranger.CertPEM+stranger.KeyPEM)
		code, body := s.mustGet(t, "web")
		h.Proc.Kill()
		s.inbound = good
		if code != 403 || !strings.Contains(body, "authorization_unavailable") {
			t.Fatalf("HAProxy with a certificate of another CA: %d %q, want 403 authorization_unavailable", code, body)
		}
		if after := s.metric(t, "haconnect_spoa_frames_rejected_total", map[string]string{"reason": spop.RejectTLS}); after <= before {
			t.Fatalf("refused handshakes not counted (%v -> %v)", before, after)
		}
	})

	t.Run("an impostor in place of the SPOA is not believed", func(t *testing.T) {
		s.spoa.Kill()
		// It accepts HAProxy's certificate, and allows everyone; only its
		// own certificate, which spoa-ca.pem did not sign, gives it away.
		fake := harness.NewForeignCA(t).IssueHost(t, "haconnect-spoa", "haconnect-spoa")
		dir := harness.TempDir(t)
		tlsCfg, err := spoa.ServerTLS(harness.WriteFile(t, dir, "c.pem", fake.CertPEM),
			harness.WriteFile(t, dir, "k.pem", fake.KeyPEM), filepath.Join(s.dir, "haproxy-ca.pem"))
		if err != nil {
			t.Fatal(err)
		}
		yes := &authz.Decision{Allow: true, Reason: authz.ReasonIntentionAllow}
		yes.Boxed.Reason, yes.Boxed.Source, yes.Boxed.SPIFFE = "intention_allow", "", ""
		srv, _ := spoa.NewServer(spoa.Config{Decider: allowAll{yes}})
		l, err := spoa.ListenConfig{TLS: tlsCfg}.Listen(s.spoaTCP)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() { _ = srv.Serve(ctx, l) }()
		if code, body := s.mustGet(t, "batch"); code != 403 || !strings.Contains(body, "authorization_unavailable") {
			t.Fatalf("with an impostor SPOA: %d %q, want 403 authorization_unavailable", code, body)
		}
	})
}

type allowAll struct{ d *authz.Decision }

func (a allowAll) Decide(string, []byte) *authz.Decision { return a.d }

// TestSPOAListenFlags: the command refuses an open TCP listener without
// TLS, half a TLS configuration and bad bounds, and makes its unix socket
// 0600 unless told otherwise.
func TestSPOAListenFlags(t *testing.T) {
	bin := harness.Binary(t, "haconnect-spoa")
	port := fmt.Sprint(harness.FreePort(t))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-listen", "0.0.0.0:" + port}, "not a loopback address"},
		{[]string{"-listen", ":" + port}, "not a loopback address"},
		{[]string{"-listen", "127.0.0.1:" + port, "-tls-cert", "x.pem"}, "go together"},
		{[]string{"-max-frame-size", "100"}, "-max-frame-size must be"},
		{[]string{"-idle-timeout", "0s"}, "-idle-timeout must be"},
		{[]string{"-listen-mode", "rw"}, "-listen-mode"},
	} {
		p := harness.Start(t, "haconnect-spoa "+strings.Join(tc.args, " "), bin, tc.args...)
		err, done := p.Wait(10 * time.Second)
		if !done {
			t.Fatalf("%v: still running", tc.args)
		}
		ws, _ := err.(interface{ Sys() any })
		if ws == nil || ws.Sys().(syscall.WaitStatus).ExitStatus() != 1 || !strings.Contains(p.Output(), tc.want) {
			t.Errorf("%v: %v, output %q; want exit 1 mentioning %q", tc.args, err, p.Output(), tc.want)
		}
	}

	sock := filepath.Join(harness.TempDir(t), "spoa.sock")
	p := harness.Start(t, "haconnect-spoa", bin, "-listen", "unix:"+sock, "-target", "api", "-consul-addr", "127.0.0.1:1")
	harness.WaitSocket(t, sock, 10*time.Second)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %#o, want 0600", fi.Mode().Perm())
	}
	p.Kill()
	if _, err := net.Dial("unix", sock); err == nil {
		t.Fatal("the socket still answers after the SPOA stopped")
	}
}
