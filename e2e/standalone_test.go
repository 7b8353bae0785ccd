package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

func TestStandaloneSPOA(t *testing.T) {
	s := startStandalone(t, 5*time.Minute)
	s.consul.SetIntentions(t, "api",
		harness.Source("web", allow), harness.Source("fresh", allow), harness.Source("*", deny))

	t.Run("allowed caller gets 200 and its identity is passed on", func(t *testing.T) {
		code, body := s.mustGet(t, "web")
		if code != 200 || body != "source=web" {
			t.Fatalf("got %d %q, want 200 \"source=web\"", code, body)
		}
	})

	t.Run("denied caller gets 403 with the reason", func(t *testing.T) {
		code, body := s.mustGet(t, "batch")
		if code != 403 || !strings.Contains(body, "intention_deny") {
			t.Fatalf("got %d %q, want 403 naming intention_deny", code, body)
		}
		if got := s.metric(t, "haconnect_spoa_decisions_total", map[string]string{"result": "deny", "reason": "intention_deny"}); got < 1 {
			t.Fatalf("decisions_total{deny,intention_deny} = %v, want >= 1", got)
		}
	})

	t.Run("no client certificate is refused in the handshake", func(t *testing.T) {
		if _, _, err := s.get(nil); err == nil {
			t.Fatal("request without a client certificate succeeded")
		}
	})

	t.Run("a spoofed source header is replaced", func(t *testing.T) {
		req, _ := http.NewRequest("GET", "https://"+s.inbound+"/", nil)
		req.Header.Set("X-Haconnect-Source", "admin")
		tr := &http.Transport{TLSClientConfig: harness.ClientTLS(s.leaves["web"], s.roots)}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "source=web" {
			t.Fatalf("app saw %q, want source=web", body)
		}
	})

	t.Run("an intention flipped to deny reaches new connections within 100ms", func(t *testing.T) {
		var took []time.Duration
		for i := 0; i < 5; i++ {
			if code, _ := s.mustGet(t, "web"); code != 200 {
				t.Fatalf("round %d: web not allowed before the flip (%d)", i, code)
			}
			s.consul.SetIntentions(t, "api",
				harness.Source("web", deny), harness.Source("fresh", allow), harness.Source("*", deny))
			took = append(took, harness.WaitFor(t, 5*time.Second, "web denied", func() bool {
				code, _ := s.mustGet(t, "web")
				return code == 403
			}))
			s.consul.SetIntentions(t, "api",
				harness.Source("web", allow), harness.Source("fresh", allow), harness.Source("*", deny))
			harness.WaitFor(t, 5*time.Second, "web allowed again", func() bool {
				code, _ := s.mustGet(t, "web")
				return code == 200
			})
		}
		sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
		t.Logf("intention write -> first denied new connection: min %s median %s max %s", took[0], took[2], took[4])
		if took[2] > 100*time.Millisecond {
			t.Fatalf("median time to deny %s, want <= 100ms (all: %v)", took[2], took)
		}
	})

	t.Run("a keep-alive connection is denied once its decision's ttl passes", func(t *testing.T) {
		ka := s.dialKeepAlive(t, "web")
		if code := ka.get(t); code != 200 {
			t.Fatalf("keep-alive before the flip: %d", code)
		}
		s.consul.SetIntentions(t, "api",
			harness.Source("web", deny), harness.Source("fresh", allow), harness.Source("*", deny))
		took := harness.WaitFor(t, 2*time.Second, "keep-alive connection denied", func() bool {
			return ka.get(t) == 403
		})
		t.Logf("open keep-alive connection denied %s after the write (ttl 300ms)", took)
		s.consul.SetIntentions(t, "api",
			harness.Source("web", allow), harness.Source("fresh", allow), harness.Source("*", deny))
		harness.WaitFor(t, 2*time.Second, "keep-alive connection allowed again", func() bool {
			return ka.get(t) == 200
		})
	})

	t.Run("consul unreachable: cached callers allowed, uncached denied, then recovery", func(t *testing.T) {
		if code, _ := s.mustGet(t, "web"); code != 200 {
			t.Fatalf("web: %d", code)
		}
		s.cutter.Cut()
		// "fresh" is allowed by an intention but has never called: only a
		// reachable Consul could decide for it.
		harness.WaitFor(t, 5*time.Second, "uncached caller denied", func() bool {
			_, body := s.mustGet(t, "fresh")
			return strings.Contains(body, "consul_unavailable")
		})
		if code, body := s.mustGet(t, "web"); code != 200 {
			t.Fatalf("cached caller during the outage: %d %q, want 200", code, body)
		}
		if up := s.metric(t, "haconnect_spoa_consul_up", nil); up != 0 {
			t.Fatalf("consul_up = %v during the outage, want 0", up)
		}
		s.cutter.Restore()
		harness.WaitFor(t, 10*time.Second, "uncached caller allowed after recovery", func() bool {
			code, _ := s.mustGet(t, "fresh")
			return code == 200
		})
		if !strings.Contains(s.spoa.Output(), "consul reachable again") {
			t.Fatalf("no recovery log line")
		}
	})

	t.Run("SPOA hung: denied after the processing timeout, then served again", func(t *testing.T) {
		if err := s.spoa.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		code, body := s.mustGet(t, "web")
		took := time.Since(start)
		_ = s.spoa.Signal(syscall.SIGCONT)
		if code != 403 || !strings.Contains(body, "authorization_unavailable") {
			t.Fatalf("with the SPOA stopped: %d %q, want 403 authorization_unavailable", code, body)
		}
		t.Logf("denied after %s (timeout processing 500ms)", took)
		harness.WaitFor(t, 10*time.Second, "web allowed after SIGCONT", func() bool {
			code, _ := s.mustGet(t, "web")
			return code == 200
		})
	})

	t.Run("SPOA down: denied (fail closed), then served again", func(t *testing.T) {
		s.spoa.Kill()
		code, body := s.mustGet(t, "web")
		if code != 403 || !strings.Contains(body, "authorization_unavailable") {
			t.Fatalf("with the SPOA down: %d %q, want 403 authorization_unavailable", code, body)
		}
		s.startSPOA(t)
		harness.WaitFor(t, 10*time.Second, "web allowed after the SPOA returns", func() bool {
			code, _ := s.mustGet(t, "web")
			return code == 200
		})
	})
}

func TestStandaloneStaleWindow(t *testing.T) {
	s := startStandalone(t, 2*time.Second)
	// The window counts from Consul's last answer; the blocking query
	// answers at the latest when the intentions change.
	written := time.Now()
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	if code, _ := s.mustGet(t, "web"); code != 200 {
		t.Fatalf("web: %d", code)
	}
	s.cutter.Cut()
	if code, _ := s.mustGet(t, "web"); code != 200 {
		t.Fatalf("cached caller right after the cut: %d", code)
	}
	harness.WaitFor(t, 10*time.Second, "cached caller denied past the stale window", func() bool {
		_, body := s.mustGet(t, "web")
		return strings.Contains(body, "consul_stale")
	})
	if since := time.Since(written); since < 2*time.Second {
		t.Fatalf("denied as stale %s after Consul's last answer, before the 2s window", since)
	}
	s.cutter.Restore()
	harness.WaitFor(t, 10*time.Second, "allowed once Consul answers again", func() bool {
		code, _ := s.mustGet(t, "web")
		return code == 200
	})
}

func TestStandaloneForeignTrustDomain(t *testing.T) {
	foreign := harness.NewForeignCA(t)
	s := startStandalone(t, time.Minute, foreign.CertPEM)
	// Consul's authorize endpoint would allow this caller: it matches an
	// allow intention by name and the endpoint ignores the trust domain.
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	s.leaves["impostor"] = foreign.Issue(t, "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web")
	code, body := s.mustGet(t, "impostor")
	if code != 403 || !strings.Contains(body, "foreign_trust_domain") {
		t.Fatalf("impostor: %d %q, want 403 foreign_trust_domain", code, body)
	}
	s.leaves["no-spiffe"] = foreign.Issue(t)
	if code, body := s.mustGet(t, "no-spiffe"); code != 403 || !strings.Contains(body, "not_spiffe") {
		t.Fatalf("certificate without a SPIFFE ID: %d %q, want 403 not_spiffe", code, body)
	}
	if code, _ := s.mustGet(t, "web"); code != 200 {
		t.Fatalf("the real web: %d", code)
	}
}

// TestSPOACommandLine checks the command's handling of bad flags and
// addresses: a clear message and a non-zero exit.
func TestSPOACommandLine(t *testing.T) {
	bin := harness.Binary(t, "haconnect-spoa")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-nope"}, 2, "flag provided but not defined"},
		{[]string{"-ttl", "soon"}, 2, "invalid value"},
		{[]string{"-ttl", "0s"}, 1, "-ttl must be"},
		{[]string{"-listen", busy.Addr().String()}, 1, "address already in use"},
		{[]string{"-listen", "127.0.0.1:99999"}, 1, "invalid port"},
		{[]string{"-log-level", "loud"}, 1, "-log-level"},
		{[]string{"-ca-file", "/nonexistent/ca.pem"}, 1, "-ca-file"},
		{[]string{"extra"}, 2, "unexpected argument"},
	} {
		p := harness.Start(t, "haconnect-spoa "+strings.Join(tc.args, " "), bin, tc.args...)
		err, done := p.Wait(10 * time.Second)
		if !done {
			t.Fatalf("%v: still running", tc.args)
		}
		code := 0
		if ee, ok := err.(interface{ Sys() any }); ok {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
				code = ws.ExitStatus()
			}
		}
		if code != tc.code || !strings.Contains(p.Output(), tc.want) {
			t.Errorf("%v: exit %d, output %q; want exit %d mentioning %q", tc.args, code, p.Output(), tc.code, tc.want)
		}
	}
}

// TestStandaloneRateLimit: the example's per-caller budget, keyed by the
// SPOA's source variable: "reports" gets 10 requests in any second.
func TestStandaloneRateLimit(t *testing.T) {
	s := startStandalone(t, 5*time.Minute)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("reports", allow), harness.Source("*", deny))
	var ok, limited int
	for i := 0; i < 50; i++ {
		switch code, body := s.mustGet(t, "reports"); {
		case code == 200:
			ok++
		case code == 429 && body == "haconnect: rate limited (source)\n":
			limited++
		default:
			t.Fatalf("request %d: %d %q", i, code, body)
		}
	}
	if ok < 10 || ok > 20 {
		t.Errorf("reports: %d of 50 passed, want 10-20", ok)
	}
	// web has no budget in the example.
	for i := 0; i < 30; i++ {
		if code, _ := s.mustGet(t, "web"); code != 200 {
			t.Fatalf("web request %d: %d", i, code)
		}
	}
	out, err := haproxy.NewAdmin(filepath.Join(s.dir, "admin.sock")).Command("show table rate_1s")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("gpc1=%d", limited); !strings.Contains(out, "key=reports") || !strings.Contains(out, want) {
		t.Errorf("show table rate_1s:\n%s\nwant reports with %s", out, want)
	}
}
