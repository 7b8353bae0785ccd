package spop

import (
	"errors"
	"strings"
)

// HeaderBlock is HAProxy's req.hdrs_bin: each header as a name and a value,
// each a SPOP varint length followed by that many bytes, ended by an empty
// name and an empty value. It aliases the frame it arrived in.
type HeaderBlock []byte

// Validate checks that the block is complete and well formed, so that
// Lookup never meets a truncated header.
func (b HeaderBlock) Validate() error {
	rest := []byte(b)
	for {
		name, n, ok := ParseString(rest)
		if !ok {
			return errors.New("header block: truncated name")
		}
		rest = rest[n:]
		value, n, ok := ParseString(rest)
		if !ok {
			return errors.New("header block: truncated value")
		}
		rest = rest[n:]
		if len(name) == 0 && len(value) == 0 {
			if len(rest) != 0 {
				return errors.New("header block: data after the end marker")
			}
			return nil
		}
	}
}

// Lookup returns the values of the header named (case-insensitively; HAProxy
// sends names in lower case), joined by ",", and whether it is present. Call
// Validate first: a malformed block ends the search.
func (b HeaderBlock) Lookup(name string) (string, bool) {
	var joined string
	found := false
	rest := []byte(b)
	for {
		n, size, ok := ParseString(rest)
		if !ok {
			break
		}
		rest = rest[size:]
		v, size, ok := ParseString(rest)
		if !ok || (len(n) == 0 && len(v) == 0) {
			break
		}
		rest = rest[size:]
		if len(n) != len(name) || !strings.EqualFold(string(n), name) {
			continue
		}
		if found {
			joined += "," + string(v)
		} else {
			joined, found = string(v), true
		}
	}
	return joined, found
}

// Names calls f with each header's name, in order, until f returns false.
// Call Validate first: a malformed block ends the walk.
func (b HeaderBlock) Names(f func(name []byte) bool) {
	rest := []byte(b)
	for {
		n, size, ok := ParseString(rest)
		if !ok {
			return
		}
		rest = rest[size:]
		v, size, ok := ParseString(rest)
		if !ok || (len(n) == 0 && len(v) == 0) || !f(n) {
			return
		}
		rest = rest[size:]
	}
}
