package spop

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Limits bound what one SPOP connection may cost.
type Limits struct {
	// MaxFrameSize is the largest frame accepted (default
	// DefaultMaxFrameSize, at least MinFrameSize, at most
	// HardMaxFrameSize). It is also what the agent answers in its HELLO:
	// the max-frame-size HAProxy then uses is the smaller of its own and
	// this one, so HAProxy never sends a frame the guard would refuse (a
	// larger tune.bufsize fails the one oversized message, not the
	// connection).
	MaxFrameSize int
	// MaxInFlight is the number of NOTIFY frames that may wait for their
	// ACK at once on one connection (default 64). The agent library starts
	// a goroutine per NOTIFY; past this bound the guard stops reading, so
	// TCP back-pressure reaches HAProxy instead of goroutines piling up.
	MaxInFlight int
	// HelloTimeout is how long a new connection may take to finish its TLS
	// handshake, if any, and send a complete HELLO (default 5s).
	HelloTimeout time.Duration
	// IdleTimeout is how long, after HELLO, the peer may take to send its
	// next complete frame (default DefaultIdleTimeout). HAProxy closes an
	// idle SPOE connection itself after its `timeout idle` (5s in the
	// shipped spoe.conf); a peer that holds one open longer without
	// sending anything is not HAProxy, or is stuck.
	IdleTimeout time.Duration
	// EvictIdleAfter is how long a connection must have been idle before
	// a Listener at its connection limit closes it to admit a new one
	// (default DefaultEvictIdleAfter).
	EvictIdleAfter time.Duration
	// WriteTimeout is how long writing one answer may take (default 10s).
	// A peer that stops reading its answers is cut off, so that the
	// goroutines and frames waiting to answer it are freed.
	WriteTimeout time.Duration
}

const (
	// MinFrameSize is the smallest max-frame-size HAProxy accepts.
	MinFrameSize = 256
	// DefaultIdleTimeout is above HAProxy's `timeout idle` (5s shipped,
	// up to 30s in older configurations).
	DefaultIdleTimeout = 60 * time.Second
)

func (l Limits) withDefaults() Limits {
	if l.MaxFrameSize <= 0 {
		l.MaxFrameSize = DefaultMaxFrameSize
	}
	l.MaxFrameSize = min(max(l.MaxFrameSize, MinFrameSize), HardMaxFrameSize)
	if l.MaxInFlight <= 0 {
		l.MaxInFlight = 64
	}
	if l.HelloTimeout <= 0 {
		l.HelloTimeout = 5 * time.Second
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = DefaultIdleTimeout
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = 10 * time.Second
	}
	if l.EvictIdleAfter <= 0 {
		l.EvictIdleAfter = DefaultEvictIdleAfter
	}
	return l
}

// Budget bounds the NOTIFY frames held at once by every connection that
// shares it. Each one costs, until its ACK is written, the library's copy
// of the frame, its decoded messages and a goroutine: the budget caps that
// memory for the whole agent, however many connections there are.
type Budget struct{ slots chan struct{} }

// NewBudget returns a budget of n frames (n >= 1).
func NewBudget(n int) *Budget { return &Budget{slots: make(chan struct{}, max(n, 1))} }

// InFlight is the number of frames held now.
func (b *Budget) InFlight() int { return len(b.slots) }

// Cap is the budget's size.
func (b *Budget) Cap() int { return cap(b.slots) }

// Guard wraps a connection from HAProxy. Its Read hands the agent library
// only frames that passed ParseFrame, in protocol order (HELLO first), with
// the HELLO's max-frame-size lowered to what the guard accepts; on the
// first bad frame or timeout Read fails, the library closes the
// connection, and OnReject is told why. Its Write counts the ACKs the
// library sends to release in-flight slots.
type Guard struct {
	net.Conn
	limits   Limits
	onReject func(reason string, err error)
	budget   *Budget // shared with other connections; nil: none

	r          *bufio.Reader
	frame      []byte // the frame being handed out (length prefix included)
	pending    []byte // what of frame Read has not returned yet
	gotHello   bool
	frameLimit int // the max-frame-size negotiated in HELLO
	slots      chan struct{}
	closed     chan struct{}
	abortOnce  sync.Once
	closeOnce  sync.Once

	mu   sync.Mutex // guards held
	held int        // NOTIFY frames read and not yet acknowledged
	// lastFrame is when the last complete frame arrived (unix ns), 0
	// before HELLO: how long the connection has been idle (Listener).
	lastFrame atomic.Int64

	wmu    sync.Mutex
	wstate writeScanner

	onClose func(*Guard)
}

// NewGuard wraps conn. onReject may be nil.
func NewGuard(conn net.Conn, limits Limits, onReject func(reason string, err error)) *Guard {
	limits = limits.withDefaults()
	g := &Guard{
		Conn:       conn,
		limits:     limits,
		onReject:   onReject,
		r:          bufio.NewReaderSize(conn, 16<<10),
		frameLimit: limits.MaxFrameSize,
		slots:      make(chan struct{}, limits.MaxInFlight),
		closed:     make(chan struct{}),
	}
	return g
}

// Read implements io.Reader for the agent library.
func (g *Guard) Read(p []byte) (int, error) {
	if len(g.pending) == 0 {
		if err := g.next(); err != nil {
			return 0, err
		}
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

// handshaker is a connection with a handshake of its own (TLS).
type handshaker interface {
	HandshakeContext(context.Context) error
}

// next reads and validates the following frame into g.pending.
func (g *Guard) next() error {
	if !g.gotHello {
		deadline := time.Now().Add(g.limits.HelloTimeout)
		if hs, ok := g.Conn.(handshaker); ok {
			// Handshake here rather than inside the first Read, so that a
			// refused client is told apart from a peer that goes away.
			_ = g.Conn.SetDeadline(deadline)
			if err := hs.HandshakeContext(context.Background()); err != nil {
				return g.fail(reject(RejectTLS, "%v", err))
			}
			_ = g.Conn.SetWriteDeadline(time.Time{})
		}
		_ = g.Conn.SetReadDeadline(deadline)
	} else {
		// The whole next frame must arrive within the idle timeout: a
		// peer trickling bytes holds a connection no longer than a
		// silent one.
		_ = g.Conn.SetReadDeadline(time.Now().Add(g.limits.IdleTimeout))
	}
	var hdr [4]byte
	if _, err := io.ReadFull(g.r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		return g.readError(err)
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size < MinFrameLength || size > uint32(g.frameLimit) {
		return g.fail(reject(RejectFrameLength, "frame length %d outside [%d, %d]", size, MinFrameLength, g.frameLimit))
	}
	if cap(g.frame) < int(size)+4 {
		g.frame = make([]byte, int(size)+4)
	}
	g.frame = g.frame[:int(size)+4]
	copy(g.frame, hdr[:])
	if _, err := io.ReadFull(g.r, g.frame[4:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return g.fail(reject(RejectFrameLength, "connection closed inside a frame"))
		}
		return g.readError(err)
	}
	typ, err := ParseFrame(g.frame[4:])
	if err != nil {
		return g.fail(err)
	}
	switch {
	case !g.gotHello && typ != TypeHaproxyHello:
		return g.fail(reject(RejectOrder, "frame type %#x before HELLO", typ))
	case g.gotHello && typ == TypeHaproxyHello:
		return g.fail(reject(RejectOrder, "second HELLO"))
	case typ == TypeHaproxyHello:
		g.gotHello = true
		g.frame, g.frameLimit = negotiateHello(g.frame, g.limits.MaxFrameSize)
	case typ == TypeNotify:
		// Wait for a free slot: the library acknowledges every NOTIFY.
		if err := g.acquire(); err != nil {
			return err
		}
	}
	g.pending = g.frame
	g.lastFrame.Store(time.Now().UnixNano())
	return nil
}

// idleSince returns when the connection last received a frame, if it is
// idle now: past HELLO, with no NOTIFY waiting for its ACK.
func (g *Guard) idleSince() (time.Time, bool) {
	last := g.lastFrame.Load()
	if last == 0 {
		return time.Time{}, false
	}
	select {
	case <-g.closed: // closing already
		return time.Time{}, false
	default:
	}
	g.mu.Lock()
	held := g.held
	g.mu.Unlock()
	return time.Unix(0, last), held == 0
}

// acquire takes a slot of the connection, then one of the shared budget.
func (g *Guard) acquire() error {
	select {
	case g.slots <- struct{}{}:
	case <-g.closed:
		return net.ErrClosed
	}
	if g.budget != nil {
		select {
		case g.budget.slots <- struct{}{}:
		case <-g.closed:
			<-g.slots
			return net.ErrClosed
		}
	}
	g.mu.Lock()
	g.held++
	g.mu.Unlock()
	return nil
}

// release gives back the slots of up to n acknowledged frames.
func (g *Guard) release(n int) {
	g.mu.Lock()
	n = min(n, g.held)
	g.held -= n
	g.mu.Unlock()
	for ; n > 0; n-- {
		<-g.slots
		if g.budget != nil {
			<-g.budget.slots
		}
	}
}

// negotiateHello rewrites a validated HAPROXY-HELLO frame (length prefix
// included) so that its max-frame-size is min(HAProxy's offer, limit): the
// agent library answers with the value it reads there. It returns the new
// frame and the negotiated size.
func negotiateHello(frame []byte, limit int) ([]byte, int) {
	body := frame[4:]
	// type(1) + flags(4) + stream-id + frame-id, all validated already.
	head := 5
	for i := 0; i < 2; i++ {
		_, n := Varint(body[head:])
		head += n
	}
	out := make([]byte, 4, len(frame)+8)
	out = append(out, body[:head]...)
	size := limit
	for kv := body[head:]; len(kv) > 0; {
		name, n, _ := ParseString(kv)
		v, m, _ := ParseValue(kv[n:])
		if string(name) == "max-frame-size" {
			if v.Int > 0 && v.Int < uint64(size) {
				size = int(v.Int)
			}
		} else {
			out = append(out, kv[:n+m]...)
		}
		kv = kv[n+m:]
	}
	const key = "max-frame-size"
	out = append(AppendVarint(out, uint64(len(key))), key...)
	out = AppendVarint(append(out, DataUint32), uint64(size))
	binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	return out, size
}

// readError reports a timeout as a rejection (before HELLO: the hello
// timeout; after: the idle timeout); other read errors pass through.
func (g *Guard) readError(err error) error {
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		return err
	}
	if !g.gotHello {
		return g.fail(reject(RejectHelloTimeout, "no HELLO within %s", g.limits.HelloTimeout))
	}
	return g.fail(reject(RejectIdleTimeout, "no complete frame within %s", g.limits.IdleTimeout))
}

func (g *Guard) fail(err error) error {
	if g.onReject != nil {
		g.onReject(RejectReason(err), fmt.Errorf("peer %s: %w", peerName(g.Conn), err))
	}
	return err
}

func peerName(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "on " + c.LocalAddr().String()
}

// Write passes the library's frames through and releases a slot per ACK.
// A write that cannot finish within the write timeout closes the
// connection: its reader then stops and every slot it holds is freed.
func (g *Guard) Write(p []byte) (int, error) {
	g.wmu.Lock()
	acks := g.wstate.scan(p)
	g.wmu.Unlock()
	_ = g.Conn.SetWriteDeadline(time.Now().Add(g.limits.WriteTimeout))
	n, err := g.Conn.Write(p)
	g.release(acks)
	if err != nil {
		g.abort()
	}
	return n, err
}

// abort closes the connection and wakes a Read waiting for a slot; the
// library then finishes the connection and calls Close.
func (g *Guard) abort() {
	g.abortOnce.Do(func() {
		close(g.closed)
		_ = g.Conn.Close()
	})
}

// Close closes the connection. The agent library calls it once the
// connection's reader has stopped and every NOTIFY it started has been
// answered, so this is where the connection's slots (in the shared budget
// and in the Listener's count) are given back: until then, the memory they
// stand for is still in use.
func (g *Guard) Close() error {
	g.abort()
	g.closeOnce.Do(func() {
		g.mu.Lock()
		n := g.held
		g.mu.Unlock()
		g.release(n)
		if g.onClose != nil {
			g.onClose(g)
		}
	})
	return nil
}

// writeScanner follows frame boundaries in the outgoing byte stream to count
// ACK frames, whatever the sizes of the individual writes.
type writeScanner struct {
	hdr  [5]byte
	nhdr int
	skip int
}

func (s *writeScanner) scan(p []byte) (acks int) {
	for len(p) > 0 {
		if s.skip > 0 {
			n := min(s.skip, len(p))
			s.skip -= n
			p = p[n:]
			continue
		}
		n := copy(s.hdr[s.nhdr:], p)
		s.nhdr += n
		p = p[n:]
		if s.nhdr < len(s.hdr) {
			return acks
		}
		if s.hdr[4] == TypeAgentAck {
			acks++
		}
		s.skip = int(binary.BigEndian.Uint32(s.hdr[:4])) - 1
		s.nhdr = 0
	}
	return acks
}

// Listener wraps accepted connections in a Guard, bounds their number and
// keeps track of them, so that a stopping agent can close the connections
// it still serves.
type Listener struct {
	l        net.Listener
	limits   Limits
	onReject func(reason string, err error)
	budget   *Budget
	conns    chan struct{} // one per open connection
	done     chan struct{}
	stopOnce sync.Once

	mu   sync.Mutex
	open map[*Guard]struct{}
}

// NewListener guards the connections l accepts: at most maxConns open at
// once (past that, Accept waits for one to close, and new connections wait
// in the kernel's backlog), each held to limits, all sharing budget (nil:
// no shared bound). onReject may be nil.
func NewListener(l net.Listener, limits Limits, maxConns int, budget *Budget, onReject func(reason string, err error)) *Listener {
	return &Listener{
		l: l, limits: limits, onReject: onReject, budget: budget,
		conns: make(chan struct{}, max(maxConns, 1)),
		done:  make(chan struct{}),
		open:  map[*Guard]struct{}{},
	}
}

// DefaultEvictIdleAfter is how long a connection must have been idle
// before a full Listener closes it to admit a new one. HAProxy keeps an idle SPOE
// connection for its `timeout idle` (5s in haconnect's spoe.conf) and
// opens one per message waiting at once: after a burst, or with several
// HAProxies sharing the agent, idle connections could hold every place
// while a new one waits in the backlog past HAProxy's hello timeout, and
// its checks fail (closed). A connection idle this long is one HAProxy
// would close itself, so closing it first costs nothing.
const DefaultEvictIdleAfter = 5 * time.Second

// Accept implements net.Listener. At the connection limit it takes the
// next connection from the backlog anyway, then makes room for it: it
// closes the longest-idle connection once one has been idle
// Limits.EvictIdleAfter, or waits for one to finish. Only that one
// connection waits in the agent; the others stay in the kernel's backlog.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case l.conns <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	default:
		c, err := l.l.Accept()
		if err != nil {
			return nil, err
		}
		if err := l.makeRoom(); err != nil {
			c.Close()
			return nil, err
		}
		return l.guard(c), nil
	}
	c, err := l.l.Accept()
	if err != nil {
		<-l.conns
		return nil, err
	}
	return l.guard(c), nil
}

// makeRoom takes a place for a connection accepted at the limit, evicting
// an idle connection if one qualifies, checking again as others go idle.
func (l *Listener) makeRoom() error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		l.evictIdle(time.Now())
		select {
		case l.conns <- struct{}{}:
			return nil
		case <-l.done:
			return net.ErrClosed
		case <-tick.C:
		}
	}
}

func (l *Listener) guard(c net.Conn) *Guard {
	g := NewGuard(c, l.limits, l.onReject)
	g.budget = l.budget
	g.onClose = l.forget
	l.mu.Lock()
	l.open[g] = struct{}{}
	l.mu.Unlock()
	return g
}

// Close stops accepting.
func (l *Listener) Close() error {
	l.stopOnce.Do(func() { close(l.done) })
	return l.l.Close()
}

// Addr implements net.Listener.
func (l *Listener) Addr() net.Addr { return l.l.Addr() }

// evictIdle closes the connection idle the longest, if it has been idle
// Limits.EvictIdleAfter; its place frees once the agent library has
// finished it.
func (l *Listener) evictIdle(now time.Time) {
	l.mu.Lock()
	var oldest *Guard
	var since time.Time
	for g := range l.open {
		if t, idle := g.idleSince(); idle && now.Sub(t) >= g.limits.EvictIdleAfter && (oldest == nil || t.Before(since)) {
			oldest, since = g, t
		}
	}
	l.mu.Unlock()
	if oldest != nil {
		if oldest.onReject != nil {
			oldest.onReject(RejectEvicted, fmt.Errorf("peer %s: idle for %s while a new connection waited (-max-conns reached)",
				peerName(oldest.Conn), now.Sub(since).Round(time.Millisecond)))
		}
		oldest.abort()
	}
}

// Conns is the number of connections accepted and not yet finished.
func (l *Listener) Conns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.open)
}

func (l *Listener) forget(g *Guard) {
	l.mu.Lock()
	delete(l.open, g)
	l.mu.Unlock()
	<-l.conns
}

// CloseConns closes every connection accepted and still open.
func (l *Listener) CloseConns() {
	l.mu.Lock()
	conns := make([]*Guard, 0, len(l.open))
	for g := range l.open {
		conns = append(conns, g)
	}
	l.mu.Unlock()
	for _, g := range conns {
		g.abort()
	}
}
