package spop

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// Limits bound what one SPOP connection may cost.
type Limits struct {
	// MaxFrameSize is the largest frame accepted (default
	// DefaultMaxFrameSize, at most HardMaxFrameSize).
	MaxFrameSize int
	// MaxInFlight is the number of NOTIFY frames that may wait for their
	// ACK at once on one connection (default 64). The agent library starts
	// a goroutine per NOTIFY; past this bound the guard stops reading, so
	// TCP back-pressure reaches HAProxy instead of goroutines piling up.
	MaxInFlight int
	// HelloTimeout is how long a new connection may take to send a complete
	// HELLO (default 5s).
	HelloTimeout time.Duration
}

func (l Limits) withDefaults() Limits {
	if l.MaxFrameSize <= 0 {
		l.MaxFrameSize = DefaultMaxFrameSize
	}
	if l.MaxFrameSize > HardMaxFrameSize {
		l.MaxFrameSize = HardMaxFrameSize
	}
	if l.MaxInFlight <= 0 {
		l.MaxInFlight = 64
	}
	if l.HelloTimeout <= 0 {
		l.HelloTimeout = 5 * time.Second
	}
	return l
}

// Guard wraps a connection from HAProxy. Its Read hands the agent library
// only frames that passed ParseFrame, in protocol order (HELLO first); on the
// first bad frame Read fails, the library closes the connection, and OnReject
// is told why. Its Write counts the ACKs the library sends to release
// in-flight slots.
type Guard struct {
	net.Conn
	limits   Limits
	onReject func(reason string, err error)

	r        *bufio.Reader
	frame    []byte // the frame being handed out (length prefix included)
	pending  []byte // what of frame Read has not returned yet
	gotHello bool
	slots    chan struct{}
	closed   chan struct{}
	once     sync.Once

	wmu    sync.Mutex
	wstate writeScanner

	onClose func(*Guard)
}

// NewGuard wraps conn. onReject may be nil.
func NewGuard(conn net.Conn, limits Limits, onReject func(reason string, err error)) *Guard {
	limits = limits.withDefaults()
	g := &Guard{
		Conn:     conn,
		limits:   limits,
		onReject: onReject,
		r:        bufio.NewReaderSize(conn, 16<<10),
		slots:    make(chan struct{}, limits.MaxInFlight),
		closed:   make(chan struct{}),
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

// next reads and validates the following frame into g.pending.
func (g *Guard) next() error {
	if !g.gotHello {
		_ = g.Conn.SetReadDeadline(time.Now().Add(g.limits.HelloTimeout))
	}
	var hdr [4]byte
	if _, err := io.ReadFull(g.r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		return g.readError(err)
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size < minFrameLen || size > uint32(g.limits.MaxFrameSize) {
		return g.fail(reject(RejectFrameLength, "frame length %d outside [%d, %d]", size, minFrameLen, g.limits.MaxFrameSize))
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
		_ = g.Conn.SetReadDeadline(time.Time{})
	case typ == TypeNotify:
		// Wait for a free slot: the library acknowledges every NOTIFY.
		select {
		case g.slots <- struct{}{}:
		case <-g.closed:
			return net.ErrClosed
		}
	}
	g.pending = g.frame
	return nil
}

// readError reports a timeout before HELLO as a rejection; other read
// errors pass through.
func (g *Guard) readError(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && !g.gotHello {
		return g.fail(reject(RejectHelloTimeout, "no HELLO within %s", g.limits.HelloTimeout))
	}
	return err
}

func (g *Guard) fail(err error) error {
	if g.onReject != nil {
		g.onReject(RejectReason(err), err)
	}
	return err
}

// Write passes the library's frames through and releases a slot per ACK.
func (g *Guard) Write(p []byte) (int, error) {
	g.wmu.Lock()
	acks := g.wstate.scan(p)
	g.wmu.Unlock()
	n, err := g.Conn.Write(p)
	for ; acks > 0; acks-- {
		select {
		case <-g.slots:
		default:
		}
	}
	return n, err
}

// Close closes the connection and wakes a Read waiting for a slot.
func (g *Guard) Close() error {
	g.once.Do(func() {
		close(g.closed)
		if g.onClose != nil {
			g.onClose(g)
		}
	})
	return g.Conn.Close()
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

// Listener wraps accepted connections in a Guard and keeps track of them,
// so that a stopping agent can close the connections it still serves.
type Listener struct {
	net.Listener
	Limits   Limits
	OnReject func(reason string, err error)

	mu    sync.Mutex
	conns map[*Guard]struct{}
}

// Accept implements net.Listener.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	g := NewGuard(c, l.Limits, l.OnReject)
	g.onClose = l.forget
	l.mu.Lock()
	if l.conns == nil {
		l.conns = map[*Guard]struct{}{}
	}
	l.conns[g] = struct{}{}
	l.mu.Unlock()
	return g, nil
}

func (l *Listener) forget(g *Guard) {
	l.mu.Lock()
	delete(l.conns, g)
	l.mu.Unlock()
}

// CloseConns closes every connection accepted and still open.
func (l *Listener) CloseConns() {
	l.mu.Lock()
	conns := make([]*Guard, 0, len(l.conns))
	for g := range l.conns {
		conns = append(conns, g)
	}
	l.mu.Unlock()
	for _, g := range conns {
		_ = g.Close()
	}
}
