package e2e

import (
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestStandaloneStaleWindowWhileAgentAnswersRoots: Consul's servers are
// gone but the local agent still answers its cached CA roots. The example
// HAProxy with haconnect-spoa serves a cached caller for the stale window
// only, counted from Consul's last answer about the destination's
// intentions; past it the caller is denied and its open TCP stream is
// closed. When Consul answers again everything recovers by itself.
func TestStandaloneStaleWindowWhileAgentAnswersRoots(t *testing.T) {
	const window = 2 * time.Second
	s := startStandalone(t, window)
	filter := harness.NewConsulFilter(t, s.consul)
	s.spoa.Kill()
	s.consulArgs = s.consul.Flags(filter.Addr, "")
	s.startSPOA(t)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	harness.WaitFor(t, 5*time.Second, "web allowed", func() bool {
		code, _ := s.mustGet(t, "web")
		return code == 200
	})
	conn, err := tls.Dial("tcp", s.tcp, harness.ClientTLS(s.leaves["web"], s.roots))
	if err != nil {
		t.Fatal(err)
	}
	stream := echoStream(t, conn, "web")

	for _, path := range []string{"/v1/connect/intentions", "/v1/discovery-chain/", "/v1/agent/connect/authorize"} {
		filter.Fail(path, "", 500, "No cluster leader")
	}
	cut := time.Now()
	if code, _ := s.mustGet(t, "web"); code != 200 {
		t.Fatalf("the cached caller right after the cut: %d", code)
	}
	// Once the intentions watch sees Consul fail (its blocking query in
	// flight returns within a quarter window), a new caller is denied.
	harness.WaitFor(t, window, "the SPOA to see Consul fail", func() bool {
		return strings.Contains(s.spoa.Output(), "consul unreachable")
	})
	if code, body := s.mustGet(t, "stranger"); code != 403 || !strings.Contains(body, "consul_unavailable") {
		t.Fatalf("a new caller while Consul fails: %d %q, want 403 consul_unavailable", code, body)
	}
	harness.WaitFor(t, 10*time.Second, "the cached caller denied past the stale window", func() bool {
		_, body := s.mustGet(t, "web")
		return strings.Contains(body, "consul_stale")
	})
	if since := time.Since(cut); since < window {
		t.Fatalf("denied as stale %v after the cut, before the %v window", since, window)
	}
	if at := stream.closedAt(3 * time.Second); at.IsZero() {
		t.Fatal("web's open stream is still open past the stale window")
	} else {
		t.Logf("open stream closed %v after the cut (window %v)", at.Sub(cut), window)
	}
	if !strings.Contains(s.spoa.Output(), "intentions past the stale window") {
		t.Errorf("the SPOA did not log the stale destination:\n%s", s.spoa.Output())
	}

	filter.Clear()
	harness.WaitFor(t, 10*time.Second, "allowed again once Consul answers", func() bool {
		code, _ := s.mustGet(t, "web")
		return code == 200
	})
}
