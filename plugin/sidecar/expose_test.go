package sidecar

import (
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/plugin/render"
)

// exposeRegistration is a sidecar registration with Proxy.Expose as Nomad
// writes it for `check { expose = true }` and `expose { path {...} }`
// (command/agent/consul/connect.go, connectProxyExposePaths: Checks false,
// ListenerPort the host port of the path's port label, Protocol as the job
// wrote it, possibly empty), plus paths Consul itself would refuse.
func exposeRegistration() *api.AgentService {
	return &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", DestinationServiceID: "web-1", LocalServicePort: 8080,
			Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: 9191}},
			Expose: api.ExposeConfig{Paths: []api.ExposePath{
				{Path: "/health", ListenerPort: 23456, LocalPathPort: 8080},
				{Path: "/metrics", ListenerPort: 23457, LocalPathPort: 9102, Protocol: "http"},
				{Path: "/grpc.health.v1.Health/Check", ListenerPort: 23458, LocalPathPort: 9090, Protocol: "HTTP2"},
				{Path: "/a b", ListenerPort: 23459, LocalPathPort: 8080},
				{Path: "/again", ListenerPort: 23456, LocalPathPort: 8080},
				{Path: "/ws", ListenerPort: 23460, LocalPathPort: 8080, Protocol: "grpc"},
			}},
		},
	}
}

func TestReadRegistrationExposePaths(t *testing.T) {
	c, err := readRegistration(exposeRegistration())
	if err != nil {
		t.Fatalf("the registration was rejected whole: %v", err)
	}
	want := exposeConfig{ServiceID: "web-1", LocalPort: 8080, Paths: []render.ExposedPath{
		{Path: "/health", ListenerPort: 23456, LocalPathPort: 8080, Protocol: render.ExposeHTTP},
		{Path: "/metrics", ListenerPort: 23457, LocalPathPort: 9102, Protocol: render.ExposeHTTP},
		{Path: "/grpc.health.v1.Health/Check", ListenerPort: 23458, LocalPathPort: 9090, Protocol: render.ExposeHTTP2},
	}}
	if !reflect.DeepEqual(c.Expose, want) {
		t.Fatalf("expose\n%+v\nwant\n%+v", c.Expose, want)
	}
	var refused []string
	for _, r := range c.Refused {
		refused = append(refused, r.Setting+"="+r.Value)
	}
	if !reflect.DeepEqual(refused, []string{"Proxy.Expose.Paths=/a b on 23459", "Proxy.Expose.Paths=/again on 23456",
		"Proxy.Expose.Paths=/ws on 23460"}) {
		t.Fatalf("refused %q", refused)
	}
	if len(c.Upstreams) != 1 {
		t.Fatal("the upstream must still be served")
	}
}

func TestExposedPathsAddTheAgentsChecks(t *testing.T) {
	svc := exposeRegistration()
	svc.Proxy.Expose.Checks = true
	reg, err := readRegistration(svc)
	if err != nil {
		t.Fatal(err)
	}
	checks := &consulwatch.ExposedChecks{AgentAddr: "192.0.2.10", Checks: []consulwatch.ExposedCheck{
		{CheckID: "service:web-1", Type: "http", ExposedPort: 21500, Path: "/ready"},
		{CheckID: "grpc", Type: "grpc", ExposedPort: 21501, Path: consulwatch.GRPCHealthPath},
		{CheckID: "not-run-yet", Type: "http", ExposedPort: 21502},
		{CheckID: "on-a-taken-port", Type: "http", ExposedPort: 23456, Path: "/x"},
		{CheckID: "unsafe", Type: "http", ExposedPort: 21503, Path: "/a$b"},
	}}
	got := exposedPaths(reg, checks)
	want := append(append([]render.ExposedPath(nil), reg.Expose.Paths...),
		render.ExposedPath{Path: "/ready", ListenerPort: 21500, LocalPathPort: 8080, Protocol: render.ExposeHTTP,
			CheckID: "service:web-1", AllowSources: []string{"192.0.2.10"}},
		render.ExposedPath{Path: consulwatch.GRPCHealthPath, ListenerPort: 21501, LocalPathPort: 8080, Protocol: render.ExposeHTTP2,
			CheckID: "grpc", AllowSources: []string{"192.0.2.10"}},
	)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("exposed\n%+v\nwant\n%+v", got, want)
	}
	// The rendered model takes them all.
	m := &render.Model{Service: "web", SelfURI: "spiffe://td.consul/ns/default/dc/dc1/svc/web", LeafFile: "/d/l", RootsFile: "/d/r",
		SPOEFile: "/d/s", AdminSocket: "/d/a", SPOAAddr: "unix@/d/spoa", LuaFile: "/d/h.lua", PeerMapFile: "/d/p.map",
		Inbound: reg.Inbound, Exposed: got}
	m.Inbound.Protocol = render.ProtocolHTTP
	if _, err := render.Render(m); err != nil {
		t.Fatal(err)
	}
	// Without Expose.Checks the agent's checks are not served.
	svc.Proxy.Expose.Checks = false
	reg, _ = readRegistration(svc)
	if got := exposedPaths(reg, checks); len(got) != 3 {
		t.Fatalf("checks exposed without Expose.Checks: %+v", got)
	}
}
