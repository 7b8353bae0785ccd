package spoptest

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/haconnect/haconnect/spoa/spop"
)

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
	return NewClient(conn, spop.DefaultMaxFrameSize, timeout)
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
	if t != spop.TypeAgentHello {
		conn.Close()
		return nil, fmt.Errorf("spoptest: expected AGENT-HELLO, got frame type %#x", t)
	}
	for kv := body; len(kv) > 0; {
		name, n, ok := spop.ParseString(kv)
		if !ok {
			break
		}
		v, m, ok := spop.ParseValue(kv[n:])
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
	Value spop.Value
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
	if t != spop.TypeAgentAck {
		return nil, fmt.Errorf("spoptest: expected ACK, got frame type %#x", t)
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
	if size < spop.MinFrameLength || size > spop.HardMaxFrameSize {
		return 0, nil, fmt.Errorf("spoptest: agent frame length %d", size)
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
		_, n := spop.Varint(rest)
		if n < 0 {
			return 0, nil, fmt.Errorf("spoptest: bad agent frame metadata")
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
			return nil, fmt.Errorf("spoptest: truncated action")
		}
		typ, scope := buf[0], buf[2]
		buf = buf[3:]
		name, n, ok := spop.ParseString(buf)
		if !ok {
			return nil, fmt.Errorf("spoptest: bad variable name")
		}
		buf = buf[n:]
		v := Var{Scope: scope, Name: string(name)}
		if typ == 1 { // set-var carries a value
			val, n, ok := spop.ParseValue(buf)
			if !ok {
				return nil, fmt.Errorf("spoptest: bad value for %q", name)
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
