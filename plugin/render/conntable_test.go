package render

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// longestConnKey is the longest "<addr>:<port>|<SPIFFE ID>" within Consul's
// name limits, spelled out: an IPv6 source at its longest text form, and
// a SPIFFE ID with a partition, a namespace and a datacenter of 63
// characters (DNS labels) and a service of 256 (the longest ACL service
// identity).
func longestConnKey() string {
	return "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255" + ":65535|" +
		"spiffe://11111111-2222-3333-4444-555555555555.consul" +
		"/ap/" + strings.Repeat("p", 63) + "/ns/" + strings.Repeat("n", 63) +
		"/dc/" + strings.Repeat("d", 63) + "/svc/" + strings.Repeat("s", 256)
}

func TestConnKeyLenHoldsTheLongestKey(t *testing.T) {
	if k := longestConnKey(); len(k) != ConnKeyLen {
		t.Fatalf("ConnKeyLen = %d, the longest key is %d bytes", ConnKeyLen, len(k))
	}
}

// Both listener kinds track their streams (an HTTP listener its upgraded
// ones) in a table whose keys hold the longest identity whole, refuse what
// they cannot track, and count it.
func TestBothListenersTrackStreamsWithWholeKeys(t *testing.T) {
	table := fmt.Sprintf("backend %s\n    stick-table type string len %d size 100k expire 30s\n", ConnTable, ConnKeyLen)
	for _, proto := range []string{ProtocolHTTP, ProtocolTCP} {
		for _, admin := range []string{"", "127.0.0.1:19000"} {
			m := model()
			m.Inbound.Protocol, m.AdminBind, m.LuaFile = proto, admin, "/d/haconnect.lua"
			out, err := Render(m)
			if err != nil {
				t.Fatal(err)
			}
			want := []string{table,
				"backend " + UntrackedTable + "\n    stick-table type string len 16 size 4 store gpc0\n",
				fmt.Sprintf("length gt %d", ConnKeyLen)}
			if proto == ProtocolHTTP {
				want = append(want,
					"http-response track-sc2 var(txn.hc_conn) table "+ConnTable+" if { status 101 }",
					"http-response deny deny_status 503")
			} else {
				want = append(want, "tcp-request content track-sc2 var(txn.hc_conn) table "+ConnTable,
					"tcp-request content reject if { var(txn.hc_untracked) -m found }")
			}
			for _, w := range want {
				if !strings.Contains(out.Config, w) {
					t.Errorf("%s listener (admin %q): no %q in\n%s", proto, admin, w, out.Config)
				}
			}
		}
	}
}

// The standalone example uses the same length.
func TestStandaloneExampleConnKeyLen(t *testing.T) {
	b, err := os.ReadFile("../../examples/standalone/haproxy.cfg")
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(b)
	for _, w := range []string{fmt.Sprintf("stick-table type string len %d size", ConnKeyLen), fmt.Sprintf("length gt %d }", ConnKeyLen)} {
		if strings.Count(cfg, w) == 0 {
			t.Errorf("examples/standalone/haproxy.cfg has no %q", w)
		}
	}
	if n := strings.Count(cfg, fmt.Sprintf("length gt %d }", ConnKeyLen)); n != 2 {
		t.Errorf("examples/standalone/haproxy.cfg checks the key length on %d listeners, want 2", n)
	}
}
