package render

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// sameNameUpstreams is model() with three upstreams named api: the local
// datacenter's (no datacenter given), dc2's and dc3's, as Consul accepts
// them in one registration.
func sameNameUpstreams() *Model {
	m := model()
	base := m.Upstreams[0]
	m.Upstreams = nil
	for i, dc := range []string{"", "dc2", "dc3"} {
		u := base
		u.Datacenter, u.BindPort = dc, 9191+i
		u.Servers = []Server{{Name: "s1", Addr: "10.0.0.1", Port: 21000 + i}, {Name: "s2"}}
		u.SNI = "api.default." + map[string]string{"": "dc1"}[dc] + dc + ".internal.td.consul"
		m.Upstreams = append(m.Upstreams, u)
	}
	return m
}

// TestUpstreamsSharingANameGetTheirOwnSections: upstreams with the same
// destination in different datacenters render sections of their own
// (HAProxy refuses a configuration with two proxies of one name), the
// names do not move when slots change (the runtime API addresses backends
// by name), and the real HAProxy accepts the result.
func TestUpstreamsSharingANameGetTheirOwnSections(t *testing.T) {
	m := sameNameUpstreams()
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"\nfrontend upstream_listener_api\n", "\nbackend upstream_api\n", "default_backend upstream_api\n",
		"\nfrontend upstream_listener_api:dc2\n", "\nbackend upstream_api:dc2\n", "default_backend upstream_api:dc2\n",
		"\nfrontend upstream_listener_api:dc3\n", "\nbackend upstream_api:dc3\n", "default_backend upstream_api:dc3\n",
	} {
		if n := strings.Count(out.Config, want); n != 1 {
			t.Errorf("%q appears %d times, want once", want, n)
		}
	}
	for i, want := range []string{"upstream_api", "upstream_api:dc2", "upstream_api:dc3"} {
		if got := m.Upstreams[i].Backend(); got != want {
			t.Errorf("upstream %d: Backend() = %q, want %q (the runtime API's name)", i, got, want)
		}
	}

	// A slot filled and one freed: same shape, same names.
	m2 := sameNameUpstreams()
	m2.Upstreams[1].Servers[1] = Server{Name: "s2", Addr: "10.0.0.9", Port: 21009}
	m2.Upstreams[2].Servers[0] = Server{Name: "s1"}
	out2, err := Render(m2)
	if err != nil {
		t.Fatal(err)
	}
	if out2.Shape != out.Shape {
		t.Error("a slot change in same-name upstreams changed the shape (would reload instead of using the runtime API)")
	}

	// Consul's SNI of each is written as a comment only: no sni keyword.
	for _, u := range m.Upstreams {
		if !strings.Contains(out.Config, "\n    #   "+u.SNI+"\n") {
			t.Errorf("SNI %s not rendered", u.SNI)
		}
	}
	for _, l := range strings.Split(out.Config, "\n") {
		if f := strings.Fields(l); len(f) > 0 && (f[0] == "server" || f[0] == "default-server") &&
			(strings.Contains(l, " sni ") || strings.Contains(l, " check-sni ")) {
			t.Errorf("a server line sends an SNI, which HAProxy 2.6 would check against the Consul leaf's (absent) DNS names: %s", l)
		}
	}

	dir := harness.TempDir(t)
	writeTestFiles(t, dir)
	m.LeafFile, m.RootsFile = filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	m.SPOEFile, m.AdminSocket = filepath.Join(dir, "spoe.conf"), filepath.Join(dir, "admin.sock")
	m.LuaFile, m.PeerMapFile = filepath.Join(dir, "haconnect.lua"), filepath.Join(dir, "upstream_peers.map")
	if out, err = Render(m); err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	cfg := harness.WriteFile(t, dir, "haproxy.cfg", out.Config)
	if b, err := exec.Command(harness.HAProxyBinary(t), "-c", "-f", cfg).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, b)
	}
}

func TestValidateRefusesAmbiguousUpstreams(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Model)
		want string
	}{
		{"same name and datacenter twice", func(m *Model) { m.Upstreams[2].Datacenter = "dc2" }, "upstream api (datacenter dc2) is listed twice"},
		{"same name twice without datacenter", func(m *Model) { m.Upstreams[1].Datacenter = "" }, "upstream api is listed twice"},
		{"separator in a datacenter", func(m *Model) { m.Upstreams[1].Datacenter = "dc:2" }, `datacenter "dc:2"`},
		{"injection in a datacenter", func(m *Model) { m.Upstreams[1].Datacenter = "dc2\n    server evil 1.2.3.4:80" }, "datacenter"},
		{"injection in an SNI", func(m *Model) { m.Upstreams[0].SNI += "\n    server evil 1.2.3.4:80" }, "SNI"},
		{"SNI too long", func(m *Model) { m.Upstreams[0].SNI = strings.Repeat("a", 254) }, "SNI"},
	} {
		m := sameNameUpstreams()
		tc.edit(m)
		if _, err := Render(m); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one mentioning %q", tc.name, err, tc.want)
		}
	}
}
