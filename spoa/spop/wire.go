// Package spop holds haconnect's side of the SPOP wire protocol (HAProxy's
// Stream Processing Offload Protocol, see HAProxy's doc/SPOE.txt):
//
//   - a strict validator for frames arriving from HAProxy (ParseFrame),
//   - Guard, a net.Conn wrapper that lets only validated frames reach the SPOE
//     agent library and bounds the work a single connection can queue,
//   - the SPOP encodings (varint, string, typed data) that package spoptest
//     reuses to speak the HAProxy side of the protocol in tests and
//     benchmarks.
//
// The agent library (github.com/negasus/haproxy-spoe-go v1.0.7) trusts its
// input: short or zero-length frames, truncated varints, a wrong typed-data
// kind in HELLO, a short IPv4 value and similar inputs panic in its reader
// goroutine and kill the process, and a length of 0 or 0x7fffffff makes it
// allocate gigabytes. Everything the library later parses is therefore checked
// here first, with the same grammar the library uses.
package spop

import (
	"errors"
	"fmt"
)

// Frame types (SPOE.txt section 3.2.4).
const (
	TypeHaproxyHello      byte = 0x01
	TypeHaproxyDisconnect byte = 0x02
	TypeNotify            byte = 0x03
	TypeAgentHello        byte = 0x65
	TypeAgentDisconnect   byte = 0x66
	TypeAgentAck          byte = 0x67
)

// Typed-data kinds (SPOE.txt section 3.1).
const (
	DataNull   byte = 0
	DataBool   byte = 1
	DataInt32  byte = 2
	DataUint32 byte = 3
	DataInt64  byte = 4
	DataUint64 byte = 5
	DataIPv4   byte = 6
	DataIPv6   byte = 7
	DataString byte = 8
	DataBinary byte = 9
)

const (
	// FlagFin is the FIN bit of a frame's FLAGS: the frame is complete
	// (not a fragment).
	FlagFin = 0x01

	// MinFrameLength is the FRAME-LENGTH of the shortest frame: type(1) +
	// flags(4) + stream-id(>=1) + frame-id(>=1).
	MinFrameLength = 7
	// maxVarintLen bounds a varint: 10 bytes already carry more than 64 bits.
	maxVarintLen = 10
	// DefaultMaxFrameSize is HAProxy's default max-frame-size
	// (tune.bufsize - 4).
	DefaultMaxFrameSize = 16380
	// HardMaxFrameSize is the largest frame haconnect accepts whatever is
	// configured.
	HardMaxFrameSize = 1 << 20
)

// Reject reasons. They are bounded so they can label a metric.
const (
	RejectFrameLength  = "frame_length"
	RejectFrameType    = "frame_type"
	RejectNotFin       = "not_fin"
	RejectMalformed    = "malformed"
	RejectBadHello     = "bad_hello_value"
	RejectOrder        = "out_of_order"
	RejectHelloTimeout = "hello_timeout"
	RejectIdleTimeout  = "idle_timeout"
	RejectTLS          = "tls_handshake"
	// RejectEvicted: an idle connection closed to admit a new one at the
	// connection limit (Listener.Accept); not the peer's fault.
	RejectEvicted = "evicted_idle"
)

// FrameError says why a frame was refused; Reason is one of the Reject*
// constants.
type FrameError struct {
	Reason string
	Detail string
}

func (e *FrameError) Error() string { return "spop: " + e.Reason + ": " + e.Detail }

func reject(reason, format string, args ...any) error {
	return &FrameError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// RejectReason extracts the reason of a FrameError, or "" for other errors.
func RejectReason(err error) string {
	var fe *FrameError
	if errors.As(err, &fe) {
		return fe.Reason
	}
	return ""
}

// Varint decodes SPOP's variable-length integer (SPOE.txt section 3.1)
// exactly as HAProxy and the agent library do. It returns the number of bytes used, or -1 if buf ends
// before the integer does or the integer is longer than maxVarintLen.
func Varint(buf []byte) (uint64, int) {
	if len(buf) == 0 {
		return 0, -1
	}
	n := uint64(buf[0])
	if n < 240 {
		return n, 1
	}
	shift := uint(4)
	for p := 1; ; p++ {
		if p >= len(buf) || p >= maxVarintLen {
			return 0, -1
		}
		n += uint64(buf[p]) << shift
		shift += 7
		if buf[p] < 128 {
			return n, p + 1
		}
	}
}

// AppendVarint appends the SPOP encoding of v to dst.
func AppendVarint(dst []byte, v uint64) []byte {
	if v < 240 {
		return append(dst, byte(v))
	}
	dst = append(dst, byte(v)|0xF0)
	v = (v - 240) >> 4
	for v >= 128 {
		dst = append(dst, byte(v)|0x80)
		v = (v - 128) >> 7
	}
	return append(dst, byte(v))
}

// Value is one decoded typed-data item. Only the fields of its Kind are set;
// Bytes aliases the frame buffer.
type Value struct {
	Kind  byte
	Bool  bool
	Int   uint64
	Bytes []byte
}

// ParseString reads a SPOP string, <varint length><bytes>, and returns
// the bytes (aliasing buf), the number of bytes of buf it used, and false
// if buf ends first.
func ParseString(buf []byte) ([]byte, int, bool) {
	l, n := Varint(buf)
	if n < 0 || l > uint64(len(buf)-n) {
		return nil, 0, false
	}
	return buf[n : n+int(l)], n + int(l), true
}

// ParseValue reads one typed-data item and returns it, the number of bytes
// of buf it used, and false if buf ends first or the kind is unknown.
func ParseValue(buf []byte) (Value, int, bool) {
	if len(buf) == 0 {
		return Value{}, 0, false
	}
	v := Value{Kind: buf[0] & 0x0F}
	rest := buf[1:]
	switch v.Kind {
	case DataNull:
		return v, 1, true
	case DataBool:
		v.Bool = buf[0]&0x10 != 0
		return v, 1, true
	case DataInt32, DataUint32, DataInt64, DataUint64:
		i, n := Varint(rest)
		if n < 0 {
			return v, 0, false
		}
		v.Int = i
		return v, 1 + n, true
	case DataIPv4, DataIPv6:
		size := 4
		if v.Kind == DataIPv6 {
			size = 16
		}
		if len(rest) < size {
			return v, 0, false
		}
		v.Bytes = rest[:size]
		return v, 1 + size, true
	case DataString, DataBinary:
		b, n, ok := ParseString(rest)
		if !ok {
			return v, 0, false
		}
		v.Bytes = b
		return v, 1 + n, true
	}
	return v, 0, false
}

// ParseFrame validates one frame body (everything after the 4-byte length)
// sent by HAProxy, with the grammar the agent library will apply to it, and
// returns the frame's type. It keeps nothing of the payload: the library
// does the decoding. It runs on every frame, so it allocates nothing.
func ParseFrame(body []byte) (frameType byte, err error) {
	if len(body) < MinFrameLength {
		return 0, reject(RejectFrameLength, "frame of %d bytes is shorter than its header", len(body))
	}
	frameType = body[0]
	flags := uint32(body[1])<<24 | uint32(body[2])<<16 | uint32(body[3])<<8 | uint32(body[4])
	rest := body[5:]
	var n int
	if _, n = Varint(rest); n < 0 {
		return 0, reject(RejectMalformed, "bad stream-id")
	}
	rest = rest[n:]
	if _, n = Varint(rest); n < 0 {
		return 0, reject(RejectMalformed, "bad frame-id")
	}
	rest = rest[n:]
	if flags&FlagFin == 0 {
		// Fragmentation is never negotiated by haconnect, so every frame
		// must be complete.
		return 0, reject(RejectNotFin, "fragmented frame")
	}
	switch frameType {
	case TypeHaproxyHello, TypeHaproxyDisconnect:
		err = checkKVList(rest)
	case TypeNotify:
		err = checkMessages(rest)
	default:
		err = reject(RejectFrameType, "frame type %#x is not sent by HAProxy", frameType)
	}
	if err != nil {
		return 0, err
	}
	return frameType, nil
}

// checkKVList checks a HELLO/DISCONNECT payload. The agent library
// type-asserts three keys (healthcheck: bool, max-frame-size: uint32,
// engine-id: string), so a different kind there is refused.
func checkKVList(buf []byte) error {
	for len(buf) > 0 {
		name, n, ok := ParseString(buf)
		if !ok {
			return reject(RejectMalformed, "bad key name")
		}
		buf = buf[n:]
		v, n, ok := ParseValue(buf)
		if !ok {
			return reject(RejectMalformed, "bad value for key %q", truncate(name))
		}
		buf = buf[n:]
		if want, typed := helloKinds[string(name)]; typed && v.Kind != want {
			return reject(RejectBadHello, "key %q has kind %d, want %d", name, v.Kind, want)
		}
	}
	return nil
}

var helloKinds = map[string]byte{
	"healthcheck":    DataBool,
	"max-frame-size": DataUint32,
	"engine-id":      DataString,
}

// checkMessages checks a NOTIFY payload: messages, each a name, an
// argument count and that many named typed values.
func checkMessages(buf []byte) error {
	for len(buf) > 0 {
		name, n, ok := ParseString(buf)
		if !ok {
			return reject(RejectMalformed, "bad message name")
		}
		buf = buf[n:]
		if len(buf) == 0 {
			return reject(RejectMalformed, "message %q has no argument count", truncate(name))
		}
		nbArgs := int(buf[0])
		buf = buf[1:]
		for i := 0; i < nbArgs; i++ {
			argName, n, ok := ParseString(buf)
			if !ok {
				return reject(RejectMalformed, "bad argument name in message %q", truncate(name))
			}
			buf = buf[n:]
			_, n, ok = ParseValue(buf)
			if !ok {
				return reject(RejectMalformed, "bad value for argument %q", truncate(argName))
			}
			buf = buf[n:]
		}
	}
	return nil
}

func truncate(b []byte) string {
	if len(b) > 32 {
		return string(b[:32]) + "..."
	}
	return string(b)
}
