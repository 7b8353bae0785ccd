package spoa

import (
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
)

// blockingDecider holds every decision until release is closed.
type blockingDecider struct{ release chan struct{} }

func (b blockingDecider) Decide(string, []byte) *authz.Decision {
	<-b.release
	return authz.Deny(authz.ReasonIntentionDeny)
}

// TestMemoryBoundUnderHostileLoad: peers that open more connections than
// allowed and fill every one with frames of the largest size, none of them
// answered, cannot make the agent hold more than its bounds: MaxConns
// connections, MaxInFlight frames. The memory this costs is measured and
// must stay under the documented worst case.
func TestMemoryBoundUnderHostileLoad(t *testing.T) {
	const (
		peers  = 2 * DefaultMaxConns
		frames = 100 // per peer, more than a connection may hold
	)
	dec := blockingDecider{release: make(chan struct{})}
	srv, err := NewServer(Config{Decider: dec})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveAgent(t, srv, l)

	var e spoptest.Encoder
	hello := append([]byte(nil), e.Hello(spop.DefaultMaxFrameSize, false)...)
	// The largest frame the agent accepts: a 16 KB "certificate".
	notify := append([]byte(nil), e.Notify(1, 1, MessageName,
		spoptest.ArgValue{Name: ArgCert, Value: make([]byte, spop.DefaultMaxFrameSize-40)})...)
	if len(notify)-4 > spop.DefaultMaxFrameSize {
		t.Fatalf("frame of %d bytes", len(notify)-4)
	}

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	var conns []net.Conn
	var wg sync.WaitGroup
	for i := 0; i < peers; i++ {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		wg.Go(func() {
			go func() { _, _ = io.Copy(io.Discard, c) }()
			if _, err := c.Write(hello); err != nil {
				return
			}
			for f := 0; f < frames; f++ {
				if _, err := c.Write(notify); err != nil {
					return
				}
			}
		})
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for (srv.Budget().InFlight() < DefaultMaxInFlight || srv.Listener().Conns() < DefaultMaxConns) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // any excess has time to show
	if n := srv.Listener().Conns(); n != DefaultMaxConns {
		t.Fatalf("%d connections served, want the bound %d", n, DefaultMaxConns)
	}
	if n := srv.Budget().InFlight(); n != DefaultMaxInFlight {
		t.Fatalf("%d frames in flight, want the bound %d", n, DefaultMaxInFlight)
	}
	runtime.GC()
	var during runtime.MemStats
	runtime.ReadMemStats(&during)
	used := int64(during.HeapInuse+during.StackInuse) - int64(before.HeapInuse+before.StackInuse)
	t.Logf("%d peers x %d frames of %d bytes: %d connections served, %d frames held, %.1f MiB of heap and stacks "+
		"(the peers' own goroutines included)", peers, frames, len(notify), srv.Listener().Conns(), srv.Budget().InFlight(),
		float64(used)/(1<<20))
	const worstCase = 40 << 20 // the README's figure for the default bounds
	if used > worstCase {
		t.Fatalf("%.1f MiB in use, above the documented worst case of %d MiB", float64(used)/(1<<20), worstCase>>20)
	}
	close(dec.release)
}
