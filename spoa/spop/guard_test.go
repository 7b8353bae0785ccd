package spop_test

import (
	"encoding/binary"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
	"github.com/negasus/haproxy-spoe-go/logger"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/negasus/haproxy-spoe-go/worker"
)

func hello() []byte {
	var e spoptest.Encoder
	return append([]byte(nil), e.Hello(spop.DefaultMaxFrameSize, false)...)
}

func notify(frameID uint64) []byte {
	var e spoptest.Encoder
	return append([]byte(nil), e.Notify(1, frameID, "haconnect-authz",
		spoptest.ArgValue{Name: "cert", Value: []byte{0x30, 0x82, 0x01}}, spoptest.ArgValue{Name: "target", Value: "api"})...)
}

// raw builds a frame from a type byte and a payload after the metadata.
func raw(typ byte, payload ...byte) []byte {
	body := append([]byte{typ, 0, 0, 0, spop.FlagFin, 0, 0}, payload...)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// serve runs the real SPOE library behind a Guard on one end of a pipe,
// writes input to the other end and returns the reject reason seen (if
// any), the number of messages handled and whether the agent finished.
func serve(t *testing.T, limits spop.Limits, handler func(*request.Request), input []byte) (string, int) {
	t.Helper()
	client, server := tcpPair(t)
	var reason atomic.Value
	var handled atomic.Int32
	g := spop.NewGuard(server, limits, func(r string, _ error) { reason.Store(r) })
	done := make(chan struct{})
	go func() {
		worker.Handle(g, func(r *request.Request) {
			handled.Add(1)
			if handler != nil {
				handler(r)
			}
		}, logger.NewNop())
		close(done)
	}()
	go func() { _, _ = io.Copy(io.Discard, client) }()
	_, _ = client.Write(input)
	_ = client.CloseWrite() // HAProxy would wait for answers: keep reading them
	defer client.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not finish")
	}
	r, _ := reason.Load().(string)
	return r, int(handled.Load())
}

// tcpPair returns both ends of a loopback TCP connection (unlike net.Pipe,
// it can be half-closed, so answers still flow after the input ends).
func tcpPair(t *testing.T) (*net.TCPConn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return client.(*net.TCPConn), server
}

func TestGuardPassesValidFrames(t *testing.T) {
	reason, handled := serve(t, spop.Limits{}, nil, slices.Concat(hello(), notify(1), notify(2)))
	if reason != "" || handled != 2 {
		t.Fatalf("reason %q, handled %d; want none and 2", reason, handled)
	}
}

// TestGuardRejects feeds the inputs that crash or exhaust the unguarded
// library (see design notes) and checks each is refused cleanly.
func TestGuardRejects(t *testing.T) {
	long := make([]byte, 300)
	for i := range long {
		long[i] = 'a'
	}
	var e spoptest.Encoder
	stringAsSize := append([]byte(nil), e.Begin(spop.TypeHaproxyHello, 0, 0).String("max-frame-size").Typed("big").Bytes()...)
	intAsHealthcheck := append([]byte(nil), e.Begin(spop.TypeHaproxyHello, 0, 0).String("healthcheck").Typed(uint32(1)).Bytes()...)
	nameTooLong := append([]byte(nil), e.Begin(spop.TypeNotify, 1, 1).String(string(long)).Bytes()...)
	nameTooLong = nameTooLong[:len(nameTooLong)-200] // claims 300 bytes, carries 100
	binary.BigEndian.PutUint32(nameTooLong, uint32(len(nameTooLong)-4))

	for _, tc := range []struct {
		name  string
		input []byte
		want  string
	}{
		{"length 0", []byte{0, 0, 0, 0, spop.TypeHaproxyHello}, spop.RejectFrameLength},
		{"length 1", []byte{0, 0, 0, 1, spop.TypeHaproxyHello}, spop.RejectFrameLength},
		{"length 5", []byte{0, 0, 0, 5, spop.TypeHaproxyHello, 0, 0, 0, 1}, spop.RejectFrameLength},
		{"length 0x7fffffff", []byte{0x7f, 0xff, 0xff, 0xff, spop.TypeHaproxyHello}, spop.RejectFrameLength},
		{"unknown type", raw(0x42), spop.RejectFrameType},
		{"agent frame type from the peer", raw(spop.TypeAgentAck), spop.RejectFrameType},
		{"notify before hello", notify(1), spop.RejectOrder},
		{"disconnect before hello", raw(spop.TypeHaproxyDisconnect), spop.RejectOrder},
		{"second hello", slices.Concat(hello(), hello()), spop.RejectOrder},
		{"string where max-frame-size is an int", stringAsSize, spop.RejectBadHello},
		{"int where healthcheck is a bool", intAsHealthcheck, spop.RejectBadHello},
		{"short ipv4", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm', 1, 1, 'a', spop.DataIPv4, 1, 2)), spop.RejectMalformed},
		{"short ipv6", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm', 1, 1, 'a', spop.DataIPv6, 1, 2, 3)), spop.RejectMalformed},
		{"message name longer than the frame", slices.Concat(hello(), nameTooLong), spop.RejectMalformed},
		{"missing argument count", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm')), spop.RejectMalformed},
		{"fewer arguments than announced", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm', 3, 1, 'a', spop.DataNull)), spop.RejectMalformed},
		{"truncated varint", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm', 1, 1, 'a', spop.DataInt64, 0xF5)), spop.RejectMalformed},
		{"unknown data type", slices.Concat(hello(), raw(spop.TypeNotify, 1, 'm', 1, 1, 'a', 0x0E)), spop.RejectMalformed},
		{"fragmented frame", slices.Concat(hello(), []byte{0, 0, 0, 7, spop.TypeNotify, 0, 0, 0, 0, 1, 1}), spop.RejectNotFin},
		{"truncated frame", slices.Concat(hello(), []byte{0, 0, 0, 50, spop.TypeNotify, 0, 0, 0, 1}), spop.RejectFrameLength},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reason, handled := serve(t, spop.Limits{}, nil, tc.input)
			if reason != tc.want {
				t.Fatalf("reject reason %q, want %q", reason, tc.want)
			}
			if handled != 0 {
				t.Fatalf("%d messages reached the handler", handled)
			}
		})
	}
}

func TestGuardHelloTimeout(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	var reason atomic.Value
	g := spop.NewGuard(server, spop.Limits{HelloTimeout: 50 * time.Millisecond}, func(r string, _ error) { reason.Store(r) })
	done := make(chan struct{})
	go func() { worker.Handle(g, func(*request.Request) {}, logger.NewNop()); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a silent connection was kept open")
	}
	if r, _ := reason.Load().(string); r != spop.RejectHelloTimeout {
		t.Fatalf("reason %q, want %q", r, spop.RejectHelloTimeout)
	}
}

func TestGuardBoundsInFlightMessages(t *testing.T) {
	const limit = 4
	var running, peak atomic.Int32
	var mu sync.Mutex
	handler := func(*request.Request) {
		n := running.Add(1)
		mu.Lock()
		if n > peak.Load() {
			peak.Store(n)
		}
		mu.Unlock()
		time.Sleep(5 * time.Millisecond)
		running.Add(-1)
	}
	frames := [][]byte{hello()}
	for i := 1; i <= 40; i++ {
		frames = append(frames, notify(uint64(i)))
	}
	reason, handled := serve(t, spop.Limits{MaxInFlight: limit}, handler, slices.Concat(frames...))
	if reason != "" || handled != 40 {
		t.Fatalf("reason %q handled %d, want none and 40", reason, handled)
	}
	if p := peak.Load(); p > limit {
		t.Fatalf("%d messages were handled at once, limit %d", p, limit)
	}
}

func TestUvarintRoundTrip(t *testing.T) {
	for _, v := range []uint64{0, 1, 239, 240, 2287, 2288, 264431, 264432, 1 << 32, 1<<53 - 1} {
		b := spop.AppendVarint(nil, v)
		got, n := spop.Varint(b)
		if got != v || n != len(b) {
			t.Fatalf("%d: decoded %d using %d of %d bytes", v, got, n, len(b))
		}
		if _, n := spop.Varint(b[:len(b)-1]); len(b) > 1 && n != -1 {
			t.Fatalf("%d: truncated encoding accepted", v)
		}
	}
}
