package spop

import "testing"

func headerBlock(pairs ...string) HeaderBlock {
	var b []byte
	for _, s := range append(pairs, "", "") {
		b = AppendVarint(b, uint64(len(s)))
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

// FuzzHeaderBlock: any bytes are either refused by Validate or looked up
// without a panic, and a valid block's lookups stay within it.
func FuzzHeaderBlock(f *testing.F) {
	f.Add([]byte(headerBlock("host", "api", "x-a", "1")), "x-a")
	f.Add([]byte{0xf0, 0xff, 0xff, 0xff, 0xff, 0x7f}, "host")
	f.Add([]byte{5, 'a'}, "a")
	f.Fuzz(func(t *testing.T, data []byte, name string) {
		b := HeaderBlock(data)
		if b.Validate() != nil {
			return
		}
		if v, ok := b.Lookup(name); !ok && v != "" {
			t.Fatalf("absent header with value %q", v)
		} else if len(v) > len(data) {
			t.Fatalf("value longer than the block: %d > %d", len(v), len(data))
		}
	})
}
