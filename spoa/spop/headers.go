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
		name, r, ok := nextString(rest)
		if !ok {
			return errors.New("header block: truncated name")
		}
		value, r, ok := nextString(r)
		if !ok {
			return errors.New("header block: truncated value")
		}
		if len(name) == 0 && len(value) == 0 {
			if len(r) != 0 {
				return errors.New("header block: data after the end marker")
			}
			return nil
		}
		rest = r
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
		n, r, ok := nextString(rest)
		if !ok {
			break
		}
		v, r, ok := nextString(r)
		if !ok || (len(n) == 0 && len(v) == 0) {
			break
		}
		rest = r
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

// nextString reads one length-prefixed string.
func nextString(buf []byte) (s, rest []byte, ok bool) {
	l, n := uvarint(buf)
	if n < 0 || l > uint64(len(buf)-n) {
		return nil, nil, false
	}
	end := n + int(l)
	return buf[n:end], buf[end:], true
}
