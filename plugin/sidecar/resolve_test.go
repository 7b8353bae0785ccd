package sidecar

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/dnsresolve"
	"github.com/haconnect/haconnect/internal/testkit/dnstest"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// dnsSidecar is a sidecar (not run) whose resolver runs against a DNS
// server the test controls.
func dnsSidecar(t *testing.T) (*Sidecar, *dnstest.Server) {
	t.Helper()
	srv, err := dnstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	s, err := New(Config{ProxyID: "web-sidecar-proxy", Dir: t.TempDir(), Launcher: haproxy.Exec{}, DNSServer: srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	// The sidecar's resolver, looking names up every 50ms instead of 5s.
	lk, err := dnsresolve.NetResolver(srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	s.resolver = dnsresolve.New(dnsresolve.Config{Lookuper: lk, Interval: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.resolver.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, srv
}

// resolvedSnapshot waits until resolveNames gives a snapshot that ok
// accepts (the resolver answers in the background), and returns it.
func resolvedSnapshot(t *testing.T, s *Sidecar, mk func() snapshot, ok func(snapshot) bool) snapshot {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		snap := mk()
		s.resolveNames(&snap)
		if ok(snap) {
			return snap
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot as wanted: endpoints %v, local %q, missing %v", snap.endpoints, snap.reg.LocalAddr, snap.missing)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func apiKeys(snap snapshot) string {
	var keys []string
	for _, e := range snap.endpoints["api"] {
		keys = append(keys, e.Key())
	}
	return strings.Join(keys, " ")
}

// A host-name instance is served on the addresses DNS gives it, in slots
// like IP instances, so that a DNS change is a runtime `set server addr`;
// a name that does not resolve leaves the other instances served.
func TestHostNameInstancesFollowDNSAtRuntime(t *testing.T) {
	s, srv := dnsSidecar(t)
	srv.Set("api-1.mesh.test", "10.0.9.1")
	mk := func() snapshot {
		snap := testSnapshot("LEAF", "ROOT")
		snap.endpoints["api"] = []endpoint{{Addr: "api-1.mesh.test", Port: 21000}, {Addr: "10.0.0.1", Port: 1},
			{Addr: "gone.mesh.test", Port: 21000}}
		return snap
	}
	// Before any answer: the IP instance alone; the render does not wait.
	first := mk()
	s.resolveNames(&first)
	if got := apiKeys(first); got != "10.0.0.1:1" || len(first.missing) != 0 {
		t.Fatalf("before DNS answered: instances %q, missing %v; want the IP instance alone and nothing waited for", got, first.missing)
	}
	snap := resolvedSnapshot(t, s, mk, func(sn snapshot) bool { return apiKeys(sn) == "10.0.0.1:1 10.0.9.1:21000" })
	prev := stateOf(t, s, snap, nil)
	if prev.model.Upstreams[0].Servers[1].Addr != "10.0.9.1" {
		t.Fatalf("slots %+v", prev.model.Upstreams[0].Servers)
	}

	srv.Set("api-1.mesh.test", "10.0.9.2")
	snap = resolvedSnapshot(t, s, mk, func(sn snapshot) bool { return apiKeys(sn) == "10.0.0.1:1 10.0.9.2:21000" })
	next := stateOf(t, s, snap, prev.slots)
	p := planApply(true, prev, next)
	cmds := fmt.Sprint(p.runtime)
	if p.method != methodRuntime || !strings.Contains(cmds, "addr 10.0.9.2 port 21000") {
		t.Fatalf("a DNS change planned %q with %s; want a runtime set server addr", p.method, cmds)
	}
	// The IP instance kept its slot.
	if next.model.Upstreams[0].Servers[0] != prev.model.Upstreams[0].Servers[0] {
		t.Fatalf("the IP instance moved: %+v -> %+v", prev.model.Upstreams[0].Servers, next.model.Upstreams[0].Servers)
	}

	// The name is gone from DNS: its instance loses its server, the rest stays.
	srv.Delete("api-1.mesh.test")
	snap = resolvedSnapshot(t, s, mk, func(sn snapshot) bool { return apiKeys(sn) == "10.0.0.1:1" })
	if p := planApply(true, next, stateOf(t, s, snap, next.slots)); p.method != methodRuntime || !strings.Contains(fmt.Sprint(p.runtime), "state maint") {
		t.Fatalf("a name gone from DNS planned %q %v; want its slot put in maintenance at runtime", p.method, p.runtime)
	}
}

// Two names for one address, or a name and the address itself, make one
// server; a name with several addresses makes one each.
func TestHostNameInstancesAreDeduplicated(t *testing.T) {
	s, srv := dnsSidecar(t)
	srv.Set("a.mesh.test", "10.0.9.1", "10.0.9.3")
	srv.Set("b.mesh.test", "10.0.9.1")
	mk := func() snapshot {
		snap := testSnapshot("LEAF", "ROOT")
		snap.endpoints["api"] = []endpoint{{Addr: "a.mesh.test", Port: 21000}, {Addr: "b.mesh.test", Port: 21000}, {Addr: "10.0.9.3", Port: 21000}}
		return snap
	}
	resolvedSnapshot(t, s, mk, func(sn snapshot) bool { return apiKeys(sn) == "10.0.9.1:21000 10.0.9.3:21000" })
}

// The local app's host name: HAProxy is configured once it resolves, and
// it keeps its last address while DNS loses it.
func TestLocalServiceHostName(t *testing.T) {
	s, srv := dnsSidecar(t)
	mk := func() snapshot {
		snap := testSnapshot("LEAF", "ROOT", 1)
		reg := *snap.reg
		reg.LocalAddr = "app.mesh.test"
		snap.reg = &reg
		return snap
	}
	waiting := mk()
	s.resolveNames(&waiting)
	if !slices.Contains(waiting.missing, "address of the local service app.mesh.test (DNS)") {
		t.Fatalf("missing %v: the local app's unresolved name must be waited for", waiting.missing)
	}
	srv.Set("app.mesh.test", "10.0.8.2", "10.0.8.1")
	snap := resolvedSnapshot(t, s, mk, func(sn snapshot) bool { return sn.reg.LocalAddr == "10.0.8.1" && len(sn.missing) == 0 })
	st := stateOf(t, s, snap, nil)
	if !strings.Contains(st.out.Config, "server app 10.0.8.1:8080") {
		t.Fatal("the local app's address is not rendered")
	}
	srv.Delete("app.mesh.test")
	deadline := time.Now().Add(3 * time.Second)
	for {
		if addrs, ok := s.resolver.Addrs("app.mesh.test"); ok && len(addrs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the resolver never saw the name gone")
		}
		time.Sleep(10 * time.Millisecond)
	}
	after := mk()
	s.resolveNames(&after)
	if after.reg.LocalAddr != "10.0.8.1" || len(after.missing) != 0 {
		t.Fatalf("name gone from DNS: local %q, missing %v; want the last address kept", after.reg.LocalAddr, after.missing)
	}
}

// A listener binds an IP: a host name as bind_address refuses the
// registration, one as an upstream's LocalBindAddress leaves that upstream
// out, each naming the setting.
func TestBindAddressHostNameRefused(t *testing.T) {
	svc := &api.AgentService{ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "web", LocalServicePort: 8080,
			LocalServiceAddress: "app.mesh.test",
			Config:              map[string]any{"bind_address": "web.mesh.test"},
			Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: 9191, LocalBindAddress: "localhost"},
				{DestinationName: "db", LocalBindPort: 9192}}}}
	if _, err := readRegistration(svc); err == nil || !strings.Contains(err.Error(), "bind_address") {
		t.Fatalf("bind_address as a host name: err %v", err)
	}
	svc.Proxy.Config["bind_address"] = "0.0.0.0"
	c, err := readRegistration(svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Upstreams) != 1 || c.Upstreams[0].Name != "db" || c.LocalAddr != "app.mesh.test" {
		t.Fatalf("read %+v: want api left out, db kept and the local app's name kept for resolving", c)
	}
	if len(c.Refused) != 1 || c.Refused[0].Setting != "Upstreams.LocalBindAddress" || c.Refused[0].Upstream != "api" {
		t.Fatalf("refusals %+v", c.Refused)
	}
}
