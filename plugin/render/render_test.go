package render

import (
	"strings"
	"testing"
)

func model() *Model {
	return &Model{
		Service: "web", SelfURI: "spiffe://td.consul/ns/default/dc/dc1/svc/web", LeafFile: "/d/leaf.pem", RootsFile: "/d/roots.pem", SPOEFile: "/d/spoe.conf",
		AdminSocket: "/d/admin.sock", SPOAAddr: "unix@/d/spoa.sock", LuaFile: "/d/haconnect.lua", PeerMapFile: "/d/upstream_peers.map", LatencyMapFile: "/d/latency_buckets.map",
		Inbound: Inbound{BindAddr: "0.0.0.0", BindPort: 21000, Protocol: ProtocolHTTP, LocalAddr: "127.0.0.1", LocalPort: 8080},
		Upstreams: []Upstream{{Name: "api", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: ProtocolHTTP,
			PeerURI: "spiffe://td.consul/ns/default/dc/dc1/svc/api",
			Servers: []Server{{Name: "s1", Addr: "10.0.0.1", Port: 21000}, {Name: "s2"}}}},
	}
}

func TestRenderShapeIgnoresOnlyServerAddresses(t *testing.T) {
	a, err := Render(model())
	if err != nil {
		t.Fatal(err)
	}
	m := model()
	m.Upstreams[0].Servers[1] = Server{Name: "s2", Addr: "10.0.0.2", Port: 21001}
	b, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	if a.Config == b.Config || a.Shape != b.Shape {
		t.Fatal("a server address change must change the config but not its shape")
	}
	if !strings.Contains(a.Config, "server s2 127.0.0.1:1 disabled") || !strings.Contains(b.Config, "server s2 10.0.0.2:21001") {
		t.Fatalf("slots not rendered as expected:\n%s", b.Config)
	}
	m.Upstreams[0].Servers = append(m.Upstreams[0].Servers, Server{Name: "s3"})
	c, _ := Render(m)
	if c.Shape == b.Shape {
		t.Fatal("a new slot must change the shape")
	}
	m.Inbound.Protocol = ProtocolTCP
	d, _ := Render(m)
	if !strings.Contains(d.Config, "tcp-request content send-spoe-group haconnect authz") {
		t.Fatal("a tcp service must be authorized with tcp-request rules")
	}
}

func TestValidateRefusesBrokenValues(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Model)
		want string
	}{
		{"port out of range", func(m *Model) { m.Inbound.BindPort = 70000 }, "inbound port 70000 is out of range"},
		{"zero local port", func(m *Model) { m.Inbound.LocalPort = 0 }, "local service port 0"},
		{"hostname as address", func(m *Model) { m.Inbound.LocalAddr = "app.local" }, "not an IP address"},
		{"protocol", func(m *Model) { m.Upstreams[0].Protocol = "thrift" }, "protocol \"thrift\""},
		{"port clash", func(m *Model) { m.Upstreams[0].BindPort = 21000 }, "also used by inbound listener"},
		{"injection in a name", func(m *Model) { m.Upstreams[0].Name = "api\n    server evil 1.2.3.4:80" }, "upstream name"},
		{"path with a space", func(m *Model) { m.LeafFile = "/d/my leaf.pem" }, "leaf file"},
		{"instance port", func(m *Model) { m.Upstreams[0].Servers[0].Port = -1 }, "instance port -1"},
		{"no Lua file without telemetry", func(m *Model) { m.AdminBind, m.LuaFile = "", "" }, "Lua file"},
		{"peer URI breaking a Lua argument", func(m *Model) { m.Upstreams[0].PeerURI += ",x" }, "peer URI"},
		{"peer URI with a space", func(m *Model) { m.Upstreams[0].PeerURI += " x" }, "peer URI"},
		{"peer map file breaking a Lua argument", func(m *Model) { m.PeerMapFile = "/d/a)b.map" }, "peer map file"},
	} {
		m := model()
		tc.edit(m)
		if _, err := Render(m); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one mentioning %q", tc.name, err, tc.want)
		}
	}
}

// A sidecar whose listeners are all tcp gets buffers that hold a 16 KiB
// response whole; one HTTP listener, inbound or upstream, keeps HAProxy's
// default, and the rendered configuration is one HAProxy accepts.
func TestBufSizeOnlyForTCPSidecars(t *testing.T) {
	for _, tc := range []struct {
		name              string
		inbound, upstream string
		want              bool
	}{
		{"all tcp", ProtocolTCP, ProtocolTCP, true},
		{"http inbound", ProtocolHTTP, ProtocolTCP, false},
		{"http upstream", ProtocolTCP, ProtocolHTTP, false},
		{"grpc upstream", ProtocolTCP, ProtocolGRPC, false},
		{"all http", ProtocolHTTP, ProtocolHTTP, false},
	} {
		m := model()
		m.Inbound.Protocol, m.Upstreams[0].Protocol = tc.inbound, tc.upstream
		out, err := Render(m)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := strings.Contains(out.Config, "\n    tune.bufsize 32768\n"); got != tc.want {
			t.Errorf("%s: tune.bufsize 32768 rendered %v, want %v", tc.name, got, tc.want)
		}
		if strings.Count(out.Config, "tune.bufsize") > 1 {
			t.Errorf("%s: tune.bufsize set more than once", tc.name)
		}
	}
}
