// Package spoptest is for tests and benchmarks: a SPOP client that speaks
// as HAProxy does (Client), and a frame encoder for valid or deliberately
// broken frames (Encoder). Production code does not import it.
package spoptest

import (
	"encoding/binary"
	"fmt"

	"github.com/haconnect/haconnect/spoa/spop"
)

// Encoder builds frames the way HAProxy sends them. It is used by Client and
// by tests that need valid or deliberately broken frames.
type Encoder struct{ buf []byte }

// Begin starts a frame of type t with the FIN flag.
func (e *Encoder) Begin(t byte, streamID, frameID uint64) *Encoder {
	e.buf = append(e.buf[:0], 0, 0, 0, 0, t, 0, 0, 0, spop.FlagFin)
	e.buf = spop.AppendVarint(e.buf, streamID)
	e.buf = spop.AppendVarint(e.buf, frameID)
	return e
}

// String appends a length-prefixed string (a key or message name).
func (e *Encoder) String(s string) *Encoder {
	e.buf = spop.AppendVarint(e.buf, uint64(len(s)))
	e.buf = append(e.buf, s...)
	return e
}

// Byte appends a raw byte (a message's argument count).
func (e *Encoder) Byte(b byte) *Encoder { e.buf = append(e.buf, b); return e }

// Typed appends a typed-data value: string, []byte, bool, uint32, uint64, int64 or nil.
func (e *Encoder) Typed(v any) *Encoder {
	switch v := v.(type) {
	case nil:
		e.buf = append(e.buf, spop.DataNull)
	case bool:
		b := spop.DataBool
		if v {
			b |= 0x10
		}
		e.buf = append(e.buf, b)
	case uint32:
		e.buf = spop.AppendVarint(append(e.buf, spop.DataUint32), uint64(v))
	case uint64:
		e.buf = spop.AppendVarint(append(e.buf, spop.DataUint64), v)
	case int64:
		e.buf = spop.AppendVarint(append(e.buf, spop.DataInt64), uint64(v))
	case string:
		e.buf = append(spop.AppendVarint(append(e.buf, spop.DataString), uint64(len(v))), v...)
	case []byte:
		e.buf = append(spop.AppendVarint(append(e.buf, spop.DataBinary), uint64(len(v))), v...)
	default:
		panic(fmt.Sprintf("spoptest: cannot encode %T", v))
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
	e.Begin(spop.TypeHaproxyHello, 0, 0).
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
	e.Begin(spop.TypeNotify, streamID, frameID).String(message).Byte(byte(len(args)))
	for _, a := range args {
		e.String(a.Name).Typed(a.Value)
	}
	return e.Bytes()
}
