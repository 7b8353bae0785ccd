package spoa

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
)

// fixedDecider answers every question the same way: the fuzz target is
// about the byte stream, not about decisions.
type fixedDecider struct{ d *authz.Decision }

func (f fixedDecider) Decide(string, []byte) *authz.Decision { return f.d }

func fuzzSeeds() [][]byte {
	var e spoptest.Encoder
	hello := append([]byte(nil), e.Hello(spop.DefaultMaxFrameSize, false)...)
	health := append([]byte(nil), e.Hello(spop.DefaultMaxFrameSize, true)...)
	msg := append([]byte(nil), e.Notify(1, 1, MessageName,
		spoptest.ArgValue{Name: ArgCert, Value: []byte{0x30, 0x82, 0x01, 0x0a}},
		spoptest.ArgValue{Name: ArgTarget, Value: "api"})...)
	wrongTypes := append([]byte(nil), e.Notify(2, 2, MessageName,
		spoptest.ArgValue{Name: ArgCert, Value: "not bytes"},
		spoptest.ArgValue{Name: ArgTarget, Value: uint64(7)})...)
	block := []byte{4, 'h', 'o', 's', 't', 3, 'a', 'p', 'i', 0, 0}
	l7 := append([]byte(nil), e.Notify(3, 3, MessageL7WithHeaders,
		spoptest.ArgValue{Name: ArgCert, Value: []byte{0x30, 0x82}},
		spoptest.ArgValue{Name: ArgMethod, Value: "GET"},
		spoptest.ArgValue{Name: ArgPath, Value: "/a?b=c"},
		spoptest.ArgValue{Name: ArgHeaders, Value: block})...)
	l7Bad := append([]byte(nil), e.Notify(4, 4, MessageL7WithHeaders,
		spoptest.ArgValue{Name: ArgMethod, Value: "GET"},
		spoptest.ArgValue{Name: ArgPath, Value: "/"},
		spoptest.ArgValue{Name: ArgHeaders, Value: block[:6]})...)
	disconnect := append([]byte(nil), e.Begin(spop.TypeHaproxyDisconnect, 0, 0).
		String("status-code").Typed(uint32(0)).String("message").Typed("bye").Bytes()...)
	return [][]byte{
		hello, health, slices.Concat(hello, msg), slices.Concat(hello, msg, wrongTypes, disconnect),
		slices.Concat(hello, msg[:len(msg)-3]),
		{0, 0, 0, 0, 1}, {0, 0, 0, 1, 1}, {0, 0, 0, 5, 1, 0, 0, 0, 1}, {0x7f, 0xff, 0xff, 0xff, 1},
		msg, slices.Concat(hello, []byte{0, 0, 0, 9, 3, 0, 0, 0, 1, 1, 1, 1, 'm'}),
		slices.Concat(hello, l7, l7Bad), slices.Concat(hello, msg, l7),
		// More frames than the in-flight bounds, kept open or not.
		slices.Concat(hello, msg, msg, msg, msg, msg, msg, msg, msg, msg),
		slices.Concat(hello, msg, msg, msg, msg, msg, msg, msg, msg, msg, []byte{0}),
		// HAProxy with a larger tune.bufsize.
		slices.Concat(append([]byte(nil), e.Hello(65532, false)...), msg),
	}
}

// FuzzAgent feeds arbitrary bytes to the agent exactly as it is served
// (Server.Serve: the guarded listener with its connection and in-flight
// bounds, spop.Guard with its deadlines, the SPOE library, Server.Handle),
// over a new connection each time. One input in sixteen (see keepOpen)
// keeps its connection open after the bytes, so the hello and idle
// deadlines must end it; the others half-close it, which keeps the fuzzer
// fast. A panic anywhere kills the fuzzing process and fails the target; so
// does a connection the agent never finishes, or one that leaves a
// connection or an in-flight frame counted after it ends.
// keepOpen picks the inputs whose connection stays open after their bytes:
// one in sixteen, by their length, so that both ways are fuzzed.
func keepOpen(data []byte) bool { return len(data)%16 == 1 }

func FuzzAgent(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	srv, err := NewServer(Config{
		Decider: fixedDecider{authz.Deny(authz.ReasonNoDestination)}, Destination: "api",
		MaxConns: 2, MaxInFlight: 4,
		Limits: spop.Limits{HelloTimeout: 50 * time.Millisecond, IdleTimeout: 100 * time.Millisecond,
			WriteTimeout: time.Second, MaxInFlight: 2},
	})
	if err != nil {
		f.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = srv.Serve(ctx, l) }()
	f.Fuzz(func(t *testing.T, data []byte) {
		client, err := net.DialTimeout("tcp", l.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		_ = client.SetDeadline(time.Now().Add(10 * time.Second))
		finished := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, client); close(finished) }()
		if _, err := client.Write(data); err != nil && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("write: %v", err)
		}
		if !keepOpen(data) {
			_ = client.(*net.TCPConn).CloseWrite()
		}
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Fatal("agent did not finish the connection")
		}
		deadline := time.Now().Add(5 * time.Second)
		for srv.Listener().Conns() != 0 || srv.Budget().InFlight() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("after the connection ended: %d connections, %d frames still counted",
					srv.Listener().Conns(), srv.Budget().InFlight())
			}
			time.Sleep(time.Millisecond)
		}
	})
}

// TestServeClosesConnectionsOnStop checks that a stopped agent leaves no
// HAProxy connection half-served.
func TestServeClosesConnectionsOnStop(t *testing.T) {
	srv, err := NewServer(Config{Decider: fixedDecider{authz.Deny(authz.ReasonNoDestination)}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	c, err := spoptest.Dial("tcp", l.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	vars, err := c.Notify(MessageName, spoptest.ArgValue{Name: ArgCert, Value: []byte{1}})
	if err != nil || len(vars) == 0 || vars[0].Name != VarAuth || vars[0].Value.Bool {
		t.Fatalf("answer before stop: %+v %v, want auth=false first", vars, err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := c.Notify(MessageName, spoptest.ArgValue{Name: ArgCert, Value: []byte{1}}); err == nil {
		t.Fatal("the connection still answered after the agent stopped")
	}
}
