package spop

import "testing"

func headerBlock(pairs ...string) HeaderBlock {
	var b []byte
	for _, s := range append(pairs, "", "") {
		b = putUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	return b
}

func TestHeaderBlock(t *testing.T) {
	b := headerBlock("host", "api", "x-a", "1", "x-b", "", "x-a", "2")
	if err := b.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, want string
		found      bool
	}{{"X-A", "1,2", true}, {"x-b", "", true}, {"host", "api", true}, {"x-c", "", false}} {
		if got, ok := b.Lookup(tc.name); got != tc.want || ok != tc.found {
			t.Errorf("Lookup(%q) = %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.found)
		}
	}
	for _, bad := range []HeaderBlock{nil, b[:len(b)-1], append(b, 0), {5, 'a'}, {0xff}} {
		if bad.Validate() == nil {
			t.Errorf("%q: malformed block accepted", bad)
		}
	}
}
