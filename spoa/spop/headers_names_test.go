package spop

import (
	"slices"
	"testing"
)

func TestHeaderBlockNames(t *testing.T) {
	b := headerBlock("host", "api", "x_role", "admin", "x-role", "", "x-role", "2")
	var got []string
	b.Names(func(n []byte) bool { got = append(got, string(n)); return true })
	if want := []string{"host", "x_role", "x-role", "x-role"}; !slices.Equal(got, want) {
		t.Fatalf("Names: %q, want %q", got, want)
	}
	got = got[:0]
	b.Names(func(n []byte) bool { got = append(got, string(n)); return len(got) < 2 })
	if want := []string{"host", "x_role"}; !slices.Equal(got, want) {
		t.Fatalf("Names stopped early: %q, want %q", got, want)
	}
	for _, bad := range []HeaderBlock{nil, b[:3], {5, 'a'}} {
		bad.Names(func([]byte) bool { return true }) // no panic
	}
}
