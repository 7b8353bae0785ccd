package spop

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// Encoder builds frames the way HAProxy sends them. It is used by Client and
// by tests that need valid or deliberately broken frames.
type Encoder struct{ buf []byte }

// Begin starts a frame of type t with the FIN flag.
func (e *Encoder) Begin(t byte, streamID, frameID uint64) *Encoder {
	e.buf = append(e.buf[:0], 0, 0, 0, 0, t, 0, 0, 0, flagFin)
	e.buf = putUvarint(e.buf, streamID)
	e.buf = putUvarint(e.buf, frameID)
	return e
}

// String appends a length-prefixed string (a key or message name).
func (e *Encoder) String(s string) *Encoder {
	e.buf = putUvarint(e.buf, uint64(len(s)))
	e.buf = append(e.buf, s...)
	return e
}

// Byte appends a raw byte (a message's argument count).
func (e *Encoder) Byte(b byte) *Encoder { e.buf = append(e.buf, b); return e }

// Typed appends a typed-data value: string, []byte, bool, uint32, uint64, int64 or nil.
func (e *Encoder) Typed(v any) *Encoder {
	switch v := v.(type) {
	case nil:
		e.buf = append(e.buf, DataNull)
	case bool:
		b := DataBool
		if v {
			b |= 0x10
		}
		e.buf = append(e.buf, b)
	case uint32:
		e.buf = putUvarint(append(e.buf, DataUint32), uint64(v))
	case uint64:
		e.buf = putUvarint(append(e.buf, DataUint64), v)
	case int64:
		e.buf = putUvarint(append(e.buf, DataInt64), uint64(v))
	case string:
		e.buf = append(putUvarint(append(e.buf, DataString), uint64(len(v))), v...)
	case []byte:
		e.buf = append(putUvarint(append(e.buf, DataBinary), uint64(len(v))), v...)
	default:
		panic(fmt.Sprintf("spop: cannot encode %T", v))
	}
	return e
}

// Bytes finishes the frame (fills in its length) and returns it. The slice
// is reused by the next Begin.
func (e *Encoder) Bytes() []byte {
	binary.BigEndian.PutUint32(e.buf[:4], uint32(len(e.buf)-4))
	return e.buf
}

// Hello encodes a HAPROXY-HELLO frame.
func (e *Encoder) Hello(maxFrameSize uint32, healthcheck bool) []byte {
	e.Begin(TypeHaproxyHello, 0, 0).
		String("supported-versions").Typed("2.0").
		String("max-frame-size").Typed(maxFrameSize).
		String("capabilities").Typed("pipelining,async").
		String("engine-id").Typed("haconnect-client")
	if healthcheck {
		e.String("healthcheck").Typed(true)
	}
	return e.Bytes()
}

// ArgValue is one named message argument for Notify.
type ArgValue struct {
	Name  string
	Value any
}

// Notify encodes a NOTIFY frame with one message.
func (e *Encoder) Notify(streamID, frameID uint64, message string, args ...ArgValue) []byte {
	e.Begin(TypeNotify, streamID, frameID).String(message).Byte(byte(len(args)))
	for _, a := range args {
		e.String(a.Name).Typed(a.Value)
	}
	return e.Bytes()
}

// Client speaks SPOP as HAProxy does, one request at a time. It exists to
// exercise a running agent in tests and benchmarks.
type Client struct {
	conn    net.Conn
	r       *bufio.Reader
	enc     Encoder
	frameID uint64
	body    []byte
	// MaxFrameSize is the max-frame-size the agent answered in its HELLO.
	MaxFrameSize uint32
}

// Dial connects to an agent and exchanges HELLO frames.
func Dial(network, addr string, timeout time.Duration) (*Client, error) {
	conn, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	return NewClient(conn, DefaultMaxFrameSize, timeout)
}

// NewClient exchanges HELLO frames on conn (a TLS connection, for
// instance), offering maxFrameSize. It closes conn if that fails.
func NewClient(conn net.Conn, maxFrameSize uint32, timeout time.Duration) (*Client, error) {
	c := &Client{conn: conn, r: bufio.NewReader(conn)}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(c.enc.Hello(maxFrameSize, false)); err != nil {
		conn.Close()
		return nil, err
	}
	t, body, err := c.readFrame()
	if err != nil {
		conn.Close()
		return nil, err
	}
	if t != TypeAgentHello {
		conn.Close()
		return nil, fmt.Errorf("spop: expected AGENT-HELLO, got frame type %#x", t)
	}
	for kv := body; len(kv) > 0; {
		name, n, ok := parseString(kv)
		if !ok {
			break
		}
		v, m, ok := parseValue(kv[n:])
		if !ok {
			break
		}
		if string(name) == "max-frame-size" {
			c.MaxFrameSize = uint32(v.Int)
		}
		kv = kv[n+m:]
	}
	_ = conn.SetDeadline(time.Time{})
	return c, nil
}

// Conn is the client's connection.
func (c *Client) Conn() net.Conn { return c.conn }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Var is a variable set by an agent in an ACK.
type Var struct {
	Scope byte
	Name  string
	Value Value
}

// Notify sends one message and returns the variables set by the ACK.
func (c *Client) Notify(message string, args ...ArgValue) ([]Var, error) {
	c.frameID++
	if _, err := c.conn.Write(c.enc.Notify(1, c.frameID, message, args...)); err != nil {
		return nil, err
	}
	t, body, err := c.readFrame()
	if err != nil {
		return nil, err
	}
	if t != TypeAgentAck {
		return nil, fmt.Errorf("spop: expected ACK, got frame type %#x", t)
	}
	return parseActions(body)
}

// readFrame reads one agent frame and returns its type and payload (after
// the metadata).
func (c *Client) readFrame() (byte, []byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size < minFrameLen || size > HardMaxFrameSize {
		return 0, nil, fmt.Errorf("spop: agent frame length %d", size)
	}
	if cap(c.body) < int(size) {
		c.body = make([]byte, size)
	}
	c.body = c.body[:size]
	if _, err := io.ReadFull(c.r, c.body); err != nil {
		return 0, nil, err
	}
	rest := c.body[5:]
	for i := 0; i < 2; i++ { // stream-id, frame-id
		_, n := uvarint(rest)
		if n < 0 {
			return 0, nil, fmt.Errorf("spop: bad agent frame metadata")
		}
		rest = rest[n:]
	}
	return c.body[0], rest, nil
}

// parseActions decodes the action list of an ACK frame.
func parseActions(buf []byte) ([]Var, error) {
	var vars []Var
	for len(buf) > 0 {
		if len(buf) < 3 {
			return nil, fmt.Errorf("spop: truncated action")
		}
		typ, scope := buf[0], buf[2]
		buf = buf[3:]
		name, n, ok := parseString(buf)
		if !ok {
			return nil, fmt.Errorf("spop: bad variable name")
		}
		buf = buf[n:]
		v := Var{Scope: scope, Name: string(name)}
		if typ == 1 { // set-var carries a value
			val, n, ok := parseValue(buf)
			if !ok {
				return nil, fmt.Errorf("spop: bad value for %q", name)
			}
			buf = buf[n:]
			if val.Bytes != nil {
				val.Bytes = append([]byte(nil), val.Bytes...)
			}
			v.Value = val
		}
		vars = append(vars, v)
	}
	return vars, nil
}
