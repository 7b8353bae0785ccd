package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// stream is a TCP connection held open through the mesh.
type stream struct {
	conn net.Conn
	r    *bufio.Reader
}

func openStream(t *testing.T, in *instance, dest string) *stream {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", in.upstream[dest]), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return echoStream(t, c, in.id+" -> "+dest)
}

// echoStream holds c open as a stream until the test ends, once it echoes
// a line; what names it in the failure.
func echoStream(t *testing.T, c net.Conn, what string) *stream {
	t.Helper()
	t.Cleanup(func() { c.Close() })
	s := &stream{conn: c, r: bufio.NewReader(c)}
	if err := s.roundTrip("hello"); err != nil {
		t.Fatalf("%s: the stream does not echo: %v", what, err)
	}
	return s
}

// roundTrip sends a line and reads it back.
func (s *stream) roundTrip(line string) error {
	_ = s.conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(s.conn, line+"\n"); err != nil {
		return err
	}
	got, err := s.r.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != line {
		return fmt.Errorf("echoed %q, want %q", got, line)
	}
	return nil
}

// closedAt waits (at most limit) for the peer to close the stream and
// returns when it noticed; the zero time if it stayed open.
func (s *stream) closedAt(limit time.Duration) time.Time {
	_ = s.conn.SetReadDeadline(time.Now().Add(limit))
	_, err := s.r.ReadByte()
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return time.Time{}
	}
	return time.Now()
}

// TestTCPRevocation checks that a deny reaches TCP streams that were open
// before it: the denied caller's streams are closed within a second, its new
// connections are refused, and other callers' streams keep flowing.
func TestTCPRevocation(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
	metrics := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	echo := m.register(&instance{id: "echo-1", args: []string{"-metrics-listen", metrics}},
		"echo", "tcp", startEcho(t))
	web := m.add("web", "web-1", "echo:tcp")
	batch := m.add("batch", "batch-1", "echo:tcp")
	harness.WaitFor(t, 10*time.Second, "echo through the mesh", func() bool {
		got, err := web.echo("echo", "ping")
		got2, err2 := batch.echo("echo", "ping")
		return err == nil && got == "ping" && err2 == nil && got2 == "ping"
	})

	var took []time.Duration
	for round := 0; round < 3; round++ {
		webStreams := []*stream{openStream(t, web, "echo"), openStream(t, web, "echo")}
		batchStream := openStream(t, batch, "echo")

		written := time.Now()
		m.consul.SetIntentions(t, "echo", harness.Source("web", deny), harness.Source("batch", allow), harness.Source("*", deny))
		for i, s := range webStreams {
			at := s.closedAt(3 * time.Second)
			if at.IsZero() {
				t.Fatalf("round %d: web's stream %d is still open 3s after the deny", round, i)
			}
			took = append(took, at.Sub(written))
		}
		if err := batchStream.roundTrip("still here"); err != nil {
			t.Fatalf("round %d: batch's stream was cut too: %v", round, err)
		}
		if got, err := web.echo("echo", "ping"); err == nil {
			t.Fatalf("round %d: a new connection from web got %q after the deny", round, got)
		}
		m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "web allowed again", func() bool {
			got, err := web.echo("echo", "ping")
			return err == nil && got == "ping"
		})
	}
	var worst time.Duration
	for _, d := range took {
		worst = max(worst, d)
	}
	t.Logf("open streams closed after the deny: %v (worst %v)", took, worst)
	if worst > time.Second {
		t.Errorf("a stream took %v to close, want <= 1s", worst)
	}

	fam := scrape(t, metrics)["haconnect_revoked_connections_total"]
	if got := find(fam, map[string]string{"reason": "intention_deny"}); got.GetCounter().GetValue() != float64(len(took)) {
		t.Errorf("haconnect_revoked_connections_total{reason=intention_deny} = %v, want %d", got.GetCounter().GetValue(), len(took))
	}
	if out := echo.sidecar.Output(); !strings.Contains(out, "closing the open connections of a caller the intentions no longer allow") ||
		!strings.Contains(out, "svc/web") {
		t.Errorf("no log line names the revoked caller:\n%s", out)
	}

	t.Run("a stream held by an old worker after a reload is closed too", func(t *testing.T) {
		held := openStream(t, web, "echo")
		oldWorker := workerPid(t, echo.dir)
		if err := syscall.Kill(parentOf(t, oldWorker), syscall.SIGUSR2); err != nil { // a hitless reload
			t.Fatal(err)
		}
		harness.WaitFor(t, 10*time.Second, "a new worker", func() bool {
			pid, err := haproxy.NewAdmin(filepath.Join(echo.dir, "admin.sock")).WorkerPid()
			return err == nil && pid != 0 && pid != oldWorker
		})
		if !alive(oldWorker) {
			t.Fatal("the old worker left although it still holds a stream")
		}
		if err := held.roundTrip("through the old worker"); err != nil {
			t.Fatal(err)
		}
		m.consul.SetIntentions(t, "echo", harness.Source("web", deny), harness.Source("batch", allow), harness.Source("*", deny))
		if held.closedAt(3 * time.Second).IsZero() {
			t.Fatal("the old worker's stream is still open 3s after the deny")
		}
		m.consul.SetIntentions(t, "echo", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("*", deny))
		harness.WaitFor(t, 5*time.Second, "web allowed again", func() bool {
			got, err := web.echo("echo", "ping")
			return err == nil && got == "ping"
		})
	})

	t.Run("HTTP permissions for a caller of a TCP listener: refused and reported", func(t *testing.T) {
		// Consul says echo speaks HTTP, its proxy registration says TCP:
		// the permissions cannot be checked on this listener.
		held := openStream(t, web, "echo")
		m.consul.SetProtocol(t, "echo", "http")
		m.consul.SetIntentions(t, "echo", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{{
			Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"},
		}}}, harness.Source("batch", allow))
		if held.closedAt(3 * time.Second).IsZero() {
			t.Fatal("web's open stream survived an intention that cannot be enforced on TCP")
		}
		if got, err := web.echo("echo", "ping"); err == nil {
			t.Fatalf("a new connection from web got %q", got)
		}
		if got, err := batch.echo("echo", "ping"); err != nil || got != "ping" {
			t.Fatalf("batch (an L4 intention) was refused: %q %v", got, err)
		}
		fam := scrape(t, metrics)["haconnect_spoa_l7_on_tcp_listener_total"]
		if got := find(fam, map[string]string{"destination": "echo"}); got.GetCounter().GetValue() < 1 {
			t.Errorf("haconnect_spoa_l7_on_tcp_listener_total{destination=echo} = %v, want >= 1", got.GetCounter().GetValue())
		}
		if out := echo.sidecar.Output(); !strings.Contains(out, "misconfiguration: the caller's intention has HTTP permissions but this listener speaks TCP") {
			t.Errorf("the misconfiguration is not logged:\n%s", out)
		}
	})
}

// TestStandaloneTCPRevocation: haconnect-spoa -revoke-socket next to the
// example configuration's TCP listener closes a revoked caller's streams.
func TestStandaloneTCPRevocation(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("batch", allow))
	dial := func(caller string) *stream {
		c, err := tls.Dial("tcp", s.tcp, harness.ClientTLS(s.leaves[caller], s.roots))
		if err != nil {
			t.Fatalf("%s: %v", caller, err)
		}
		return echoStream(t, c, caller)
	}
	web, batch := dial("web"), dial("batch")
	written := time.Now()
	s.consul.SetIntentions(t, "api", harness.Source("web", deny), harness.Source("batch", allow))
	at := web.closedAt(3 * time.Second)
	if at.IsZero() {
		t.Fatal("web's stream is still open 3s after the deny")
	}
	t.Logf("web's stream closed %v after the deny", at.Sub(written))
	if at.Sub(written) > time.Second {
		t.Errorf("closed after %v, want <= 1s", at.Sub(written))
	}
	if err := batch.roundTrip("still here"); err != nil {
		t.Fatalf("batch's stream was cut too: %v", err)
	}
	if got := s.metric(t, "haconnect_revoked_connections_total", map[string]string{"reason": "intention_deny"}); got != 1 {
		t.Errorf("haconnect_revoked_connections_total{reason=intention_deny} = %v, want 1", got)
	}
}
