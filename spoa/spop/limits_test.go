package spop_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
	"github.com/negasus/haproxy-spoe-go/agent"
	"github.com/negasus/haproxy-spoe-go/logger"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/negasus/haproxy-spoe-go/worker"
)

// agentOn serves the real SPOE library behind a Listener with the given
// bounds and returns the listener and the last reject reason seen.
func agentOn(t *testing.T, limits spop.Limits, maxConns int, budget *spop.Budget, handler func(*request.Request)) (*spop.Listener, *atomic.Value) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reason := &atomic.Value{}
	l := spop.NewListener(raw, limits, maxConns, budget, func(r string, _ error) { reason.Store(r) })
	if handler == nil {
		handler = func(*request.Request) {}
	}
	go func() { _ = agent.New(handler, logger.NewNop()).Serve(l) }()
	t.Cleanup(func() { l.Close(); l.CloseConns() })
	return l, reason
}

// bigNotify is a NOTIFY frame of about size bytes (one binary argument).
func bigNotify(frameID uint64, size int) []byte {
	var e spoptest.Encoder
	return append([]byte(nil), e.Notify(1, frameID, "haconnect-l7-headers",
		spoptest.ArgValue{Name: "headers", Value: make([]byte, size-40)})...)
}

// waitClosed reads c until the agent closes it, within limit.
func waitClosed(t *testing.T, c net.Conn, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(limit))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the agent kept the connection open for %s", limit)
	}
	return time.Since(start)
}

// TestGuardNegotiatesFrameSize: the agent answers the max-frame-size it
// enforces (the smaller of HAProxy's and its own), so HAProxy never sends
// a frame the guard would refuse; the library alone echoes HAProxy's.
func TestGuardNegotiatesFrameSize(t *testing.T) {
	for _, tc := range []struct {
		limit int
		offer uint32
		want  uint32
	}{
		{0, 65532, spop.DefaultMaxFrameSize}, // tune.bufsize 65536 against the default
		{0, 4092, 4092},                      // HAProxy's is smaller: it stands
		{65532, 65532, 65532},                // raised with -max-frame-size
		{100000, 65532, 65532},
	} {
		l, _ := agentOn(t, spop.Limits{MaxFrameSize: tc.limit}, 4, nil, nil)
		conn, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c, err := spoptest.NewClient(conn, tc.offer, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if c.MaxFrameSize != tc.want {
			t.Errorf("limit %d, HAProxy offers %d: agent answered %d, want %d", tc.limit, tc.offer, c.MaxFrameSize, tc.want)
		}
		c.Close()
	}

	// A frame within the negotiated size is served; one over it (which
	// HAProxy no longer sends) closes the connection.
	var handled atomic.Int32
	l, reason := agentOn(t, spop.Limits{MaxFrameSize: 65532}, 4, nil, func(*request.Request) { handled.Add(1) })
	conn, _ := net.Dial("tcp", l.Addr().String())
	c, err := spoptest.NewClient(conn, 65532, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Notify("haconnect-l7-headers", spoptest.ArgValue{Name: "headers", Value: make([]byte, 40000)}); err != nil || handled.Load() != 1 {
		t.Fatalf("40 KB frame with max-frame-size 65532: %v, handled %d", err, handled.Load())
	}
	_, _ = conn.Write(bigNotify(9, 70000))
	waitClosed(t, conn, 5*time.Second)
	if r, _ := reason.Load().(string); r != spop.RejectFrameLength {
		t.Fatalf("reason %q, want %q", r, spop.RejectFrameLength)
	}
}

// TestGuardIdleTimeout: after HELLO, a peer that sends nothing, or trickles
// a frame, is cut off after the idle timeout; one that keeps sending frames
// is not.
func TestGuardIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	var handled atomic.Int32
	l, reason := agentOn(t, spop.Limits{IdleTimeout: idle}, 4, nil, func(*request.Request) { handled.Add(1) })

	silent, err := spoptest.Dial("tcp", l.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	took := waitClosed(t, silent.Conn(), 10*time.Second)
	if r, _ := reason.Load().(string); r != spop.RejectIdleTimeout {
		t.Fatalf("silent peer: reason %q, want %q", r, spop.RejectIdleTimeout)
	}
	t.Logf("silent connection closed after %s (idle timeout %s)", took, idle)

	reason.Store("")
	trickler, err := spoptest.Dial("tcp", l.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for _, b := range notify(1) { // one byte every 100ms: ~6s for the frame
			if _, err := trickler.Conn().Write([]byte{b}); err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	waitClosed(t, trickler.Conn(), 10*time.Second)
	if r, _ := reason.Load().(string); r != spop.RejectIdleTimeout || handled.Load() != 0 {
		t.Fatalf("trickling peer: reason %q handled %d, want %q and 0", r, handled.Load(), spop.RejectIdleTimeout)
	}

	reason.Store("")
	busy, err := spoptest.Dial("tcp", l.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for i := 0; i < 10; i++ { // 1s in all, frames 100ms apart
		if _, err := busy.Notify("haconnect-authz", spoptest.ArgValue{Name: "target", Value: "api"}); err != nil {
			t.Fatalf("busy peer, frame %d: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r, _ := reason.Load().(string); r != "" {
		t.Fatalf("busy peer rejected: %q", r)
	}
}

// TestGuardWriteTimeout: a peer that stops reading its answers is cut off,
// and the frames it held are given back to the shared budget.
func TestGuardWriteTimeout(t *testing.T) {
	client, server := net.Pipe() // unbuffered: an unread answer blocks its writer
	defer client.Close()
	budget := spop.NewBudget(8)
	g := spop.NewGuard(server, spop.Limits{WriteTimeout: 200 * time.Millisecond}, nil)
	g.SetBudget(budget)
	done := make(chan struct{})
	go func() { worker.Handle(g, func(*request.Request) {}, logger.NewNop()); close(done) }()
	go func() {
		var frames []byte
		frames = append(frames, hello()...)
		for i := uint64(1); i <= 3; i++ {
			frames = append(frames, notify(i)...)
		}
		_, _ = client.Write(frames) // the AGENT-HELLO is never read either
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a peer that reads nothing kept its connection and frames")
	}
	if n := budget.InFlight(); n != 0 {
		t.Fatalf("%d frames still counted in flight after the connection ended", n)
	}
}

// TestListenerBounds: however many connections and frames a peer sends,
// no more than maxConns connections are served and no more than the
// budget's frames are held at once; everything is answered once the
// handlers finish, and nothing stays counted.
func TestListenerBounds(t *testing.T) {
	const (
		maxConns = 3
		budget   = 5
		clients  = 8
		frames   = 40 // per client, fewer than MaxInFlight per connection
	)
	var running, peakRunning, handled atomic.Int32
	release := make(chan struct{})
	var peakConns atomic.Int32
	b := spop.NewBudget(budget)
	var l *spop.Listener
	handler := func(*request.Request) {
		n := running.Add(1)
		for p := peakRunning.Load(); n > p && !peakRunning.CompareAndSwap(p, n); p = peakRunning.Load() {
		}
		for c := int32(l.Conns()); c > peakConns.Load(); {
			peakConns.Store(c)
		}
		if b.InFlight() > budget {
			t.Errorf("budget exceeded: %d", b.InFlight())
		}
		<-release
		running.Add(-1)
		handled.Add(1)
	}
	l, _ = agentOn(t, spop.Limits{}, maxConns, b, handler)

	var wg sync.WaitGroup
	var acks atomic.Int32
	for i := 0; i < clients; i++ {
		wg.Go(func() {
			conn, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			input := hello()
			for f := uint64(1); f <= frames; f++ {
				input = append(input, notify(f)...)
			}
			go func() { _, _ = conn.Write(input) }()
			// Read the AGENT-HELLO and every ACK, then leave.
			var hdr [4]byte
			for got := -1; got < frames; got++ {
				if _, err := io.ReadFull(conn, hdr[:]); err != nil {
					t.Errorf("client: %v after %d answers", err, got+1)
					return
				}
				body := make([]byte, binary.BigEndian.Uint32(hdr[:]))
				if _, err := io.ReadFull(conn, body); err != nil {
					t.Error(err)
					return
				}
				if body[0] == spop.TypeAgentAck {
					acks.Add(1)
				}
			}
		})
	}
	// Let the hostile load pile up against the bounds, then check them.
	deadline := time.Now().Add(10 * time.Second)
	for running.Load() < budget && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // would-be excess has time to show
	if r := running.Load(); r != budget {
		t.Fatalf("%d handlers running while all are blocked, want exactly the budget %d", r, budget)
	}
	if c := l.Conns(); c != maxConns {
		t.Fatalf("%d connections served, want exactly %d", c, maxConns)
	}
	close(release)
	wg.Wait()
	if a := acks.Load(); a != clients*frames {
		t.Fatalf("%d answers, want %d", a, clients*frames)
	}
	if p := peakRunning.Load(); p > budget {
		t.Fatalf("peak %d handlers at once, budget %d", p, budget)
	}
	if p := peakConns.Load(); p > maxConns {
		t.Fatalf("peak %d connections, bound %d", p, maxConns)
	}
	deadline = time.Now().Add(5 * time.Second)
	for (l.Conns() != 0 || b.InFlight() != 0) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if l.Conns() != 0 || b.InFlight() != 0 {
		t.Fatalf("after every client left: %d connections, %d frames still counted", l.Conns(), b.InFlight())
	}
}

func TestNegotiateHelloKeepsOtherKeys(t *testing.T) {
	frame, size := spop.NegotiateHello(hello(), 1000)
	if size != 1000 {
		t.Fatalf("size %d", size)
	}
	if _, err := spop.ParseFrame(frame[4:]); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"supported-versions", "capabilities", "engine-id", "max-frame-size"} {
		if !strings.Contains(string(frame), key) {
			t.Errorf("%s lost", key)
		}
	}
	if int(binary.BigEndian.Uint32(frame)) != len(frame)-4 {
		t.Fatal("length prefix not updated")
	}
}

// TestListenerEvictsIdle: at its connection limit the Listener closes a
// connection that has been idle Limits.EvictIdleAfter (one HAProxy keeps
// after a burst, or another HAProxy's) to admit a new one, and counts it;
// a connection idle for less, or one with a message in flight (see
// TestListenerBounds), keeps its place and the new one waits.
func TestListenerEvictsIdle(t *testing.T) {
	// readFrames reads n frames from c within a second.
	readFrames := func(c net.Conn, n int) error {
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		var hdr [4]byte
		for i := 0; i < n; i++ {
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, make([]byte, binary.BigEndian.Uint32(hdr[:]))); err != nil {
				return err
			}
		}
		return nil
	}
	for _, tc := range []struct {
		name    string
		after   time.Duration
		evicted bool
	}{{"idle past the bound", 100 * time.Millisecond, true}, {"idle within the bound", time.Hour, false}} {
		t.Run(tc.name, func(t *testing.T) {
			l, reason := agentOn(t, spop.Limits{EvictIdleAfter: tc.after}, 1, nil, nil)
			first, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer first.Close()
			if _, err := first.Write(append(hello(), notify(1)...)); err != nil {
				t.Fatal(err)
			}
			if err := readFrames(first, 2); err != nil { // AGENT-HELLO, ACK
				t.Fatalf("first connection: %v", err)
			}
			time.Sleep(300 * time.Millisecond)
			second, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer second.Close()
			if _, err := second.Write(hello()); err != nil {
				t.Fatal(err)
			}
			err = readFrames(second, 1)
			if tc.evicted {
				if err != nil {
					t.Fatalf("the new connection was not served: %v", err)
				}
				waitClosed(t, first, time.Second)
				if r, _ := reason.Load().(string); r != spop.RejectEvicted {
					t.Fatalf("reason %q, want %q", r, spop.RejectEvicted)
				}
				return
			}
			if err == nil {
				t.Fatal("the new connection was served past the limit while the other was idle within the bound")
			}
			if r, _ := reason.Load().(string); r != "" {
				t.Fatalf("a connection was closed (%q)", r)
			}
		})
	}
}
