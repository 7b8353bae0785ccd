package sidecar

import (
	"reflect"
	"slices"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// The plan is decided from values alone: these tests run neither HAProxy
// nor Consul.

const testTD = "11111111-2222-3333-4444-555555555555.consul"

func testSidecar(t *testing.T, l haproxy.Launcher) *Sidecar {
	t.Helper()
	s, err := New(Config{ProxyID: "web-sidecar-proxy", Dir: t.TempDir(), Launcher: l})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testSnapshot is web's complete watched state: an HTTP listener, the
// upstream api with the given instances (ports on 10.0.0.1).
func testSnapshot(leaf, root string, apiPorts ...int) snapshot {
	return snapshot{
		reg: &proxyConfig{Service: "web",
			Inbound:   render.Inbound{BindAddr: "0.0.0.0", BindPort: 21000, Protocol: render.ProtocolHTTP, LocalAddr: "127.0.0.1", LocalPort: 8080},
			Upstreams: []render.Upstream{{Name: "api", BindAddr: "127.0.0.1", BindPort: 9191, Protocol: render.ProtocolHTTP}},
		},
		leaf:      &api.LeafCert{ServiceURI: "spiffe://" + testTD + "/ns/default/dc/dc1/svc/web", CertPEM: leaf, PrivateKeyPEM: "KEY"},
		roots:     &api.CARootList{TrustDomain: testTD, Roots: []*api.CARoot{{RootCertPEM: root}}},
		endpoints: map[string][]endpoint{"api": eps(apiPorts...)},
	}
}

// stateOf is the state snap asks for, its instances placed from slots.
func stateOf(t *testing.T, s *Sidecar, snap snapshot, slots map[string][]string) appliedState {
	t.Helper()
	model, next := s.buildModel(snap, "unix@"+s.path("spoa.sock"), slots)
	out, err := render.Render(model)
	if err != nil {
		t.Fatal(err)
	}
	return appliedState{model: model, out: out, leafPEM: leafPEM(snap), rootsPEM: rootsPEM(snap), slots: next}
}

func fileNames(files []file) []string {
	var names []string
	for _, f := range files {
		names = append(names, f.name)
	}
	return names
}

func TestPlanStartsWhatDoesNotRun(t *testing.T) {
	s := testSidecar(t, nil)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)
	p := planApply(false, appliedState{}, next)
	if p.method != methodStart || p.runtime != nil || p.next.out != next.out {
		t.Fatalf("plan %+v, want a start of next", p)
	}
	// The native L7 maps too: the test sidecar runs its own SPOA.
	want := []string{"leaf.pem", "roots.pem", "spoe.conf", "haconnect.lua", "upstream_peers.map", "rate_limits.map", "latency_buckets.map",
		"l7_sets.map", "l7_exact.map", "l7_prefix.map"}
	if got := fileNames(p.files); !slices.Equal(got, want) {
		t.Fatalf("a start writes %v, want every file %v", got, want)
	}
	if p.files[0].data != "LEAF\nKEY\n" || p.files[2].data != next.out.SPOE || p.files[4].data != "" {
		t.Fatalf("files %+v", p.files)
	}
}

func TestPlanNothingWhenNothingChanged(t *testing.T) {
	s := testSidecar(t, nil)
	prev := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1, 2), nil)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 2, 1), prev.slots)
	if p := planApply(true, prev, next); p.method != "" || p.files != nil || p.runtime != nil {
		t.Fatalf("plan %+v, want nothing", p)
	}
}

func TestPlanMovesInstancesThroughTheRuntimeAPI(t *testing.T) {
	s := testSidecar(t, nil)
	prev := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1, 2), nil)
	// Instance 1 leaves, 3 arrives: 2 keeps its slot, 3 takes 1's.
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 2, 3), prev.slots)
	p := planApply(true, prev, next)
	// The slot held instance 1: maintenance first, so that HAProxy drops
	// its idle connections to the old address.
	want := []haproxy.Command{
		haproxy.SetServerState("upstream_api", "s1", haproxy.ServerMaint),
		haproxy.SetServerAddr("upstream_api", "s1", "10.0.0.1", 3),
		haproxy.SetServerState("upstream_api", "s1", haproxy.ServerReady),
		haproxy.SetServerHealth("upstream_api", "s1", haproxy.HealthUp),
	}
	if p.method != methodRuntime || !reflect.DeepEqual(p.runtime, want) || p.files != nil {
		t.Fatalf("plan %s %v files %v, want runtime %v and no file", p.method, p.runtime, fileNames(p.files), want)
	}
	// Instance 2 leaves: its slot is parked.
	last := stateOf(t, s, testSnapshot("LEAF", "ROOT", 3), next.slots)
	p = planApply(true, next, last)
	want = []haproxy.Command{haproxy.SetServerState("upstream_api", "s2", haproxy.ServerMaint)}
	if p.method != methodRuntime || !reflect.DeepEqual(p.runtime, want) {
		t.Fatalf("plan %s %v, want runtime %v", p.method, p.runtime, want)
	}
}

// TestPlanRotatesCertificates: new roots go through the runtime API; a new
// leaf is a reload (see planApply), with both files written first.
func TestPlanRotatesCertificates(t *testing.T) {
	s := testSidecar(t, nil)
	prev := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)
	next := stateOf(t, s, testSnapshot("LEAF2", "ROOT2", 1), prev.slots)
	p := planApply(true, prev, next)
	if p.method != methodReload || p.reason != reasonLeaf || p.runtime != nil {
		t.Fatalf("plan %s (%q) %v, want a reload for the leaf", p.method, p.reason, p.runtime)
	}
	if got := fileNames(p.files); !slices.Equal(got, []string{"leaf.pem", "roots.pem"}) {
		t.Fatalf("files %v, want leaf.pem and roots.pem (the reload reads them)", got)
	}
	// The roots alone.
	roots := s.path("roots.pem")
	p = planApply(true, p.next, stateOf(t, s, testSnapshot("LEAF2", "ROOT3", 1), next.slots))
	want := []haproxy.Command{haproxy.SetSSLCAFile(roots, "ROOT3\n"), haproxy.CommitSSLCAFile(roots)}
	if p.method != methodRuntime || !reflect.DeepEqual(p.runtime, want) {
		t.Fatalf("plan %s %v, want runtime %v", p.method, p.runtime, want)
	}
}

func TestPlanReloadsWhatTheRuntimeAPICannotChange(t *testing.T) {
	s := testSidecar(t, nil)
	prev := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)

	// A fifth instance needs more slots: a new shape.
	grown := stateOf(t, s, testSnapshot("LEAF2", "ROOT", 1, 2, 3, 4, 5), prev.slots)
	p := planApply(true, prev, grown)
	if p.method != methodReload || p.runtime != nil || p.next.out.Config != grown.out.Config {
		t.Fatalf("more slots: plan %s %v, want a reload", p.method, p.runtime)
	}
	if got := fileNames(p.files); !slices.Equal(got, []string{"leaf.pem"}) {
		t.Fatalf("files %v, want the new leaf written before the reload", got)
	}

	// Another upstream.
	snap := testSnapshot("LEAF", "ROOT", 1)
	snap.reg.Upstreams = append(snap.reg.Upstreams, render.Upstream{Name: "db", BindAddr: "127.0.0.1", BindPort: 9192, Protocol: render.ProtocolTCP})
	snap.endpoints["db"] = eps(5432)
	if p := planApply(true, prev, stateOf(t, s, snap, prev.slots)); p.method != methodReload || p.files != nil {
		t.Fatalf("a new upstream: plan %s files %v, want a reload", p.method, fileNames(p.files))
	}

	// The listener's protocol changes the SPOE messages too.
	snap = testSnapshot("LEAF", "ROOT", 1)
	snap.reg.Protocol = render.ProtocolTCP
	p = planApply(true, prev, stateOf(t, s, snap, prev.slots))
	if p.method != methodReload || !slices.Equal(fileNames(p.files), []string{"spoe.conf"}) {
		t.Fatalf("another protocol: plan %s files %v, want spoe.conf written and a reload", p.method, fileNames(p.files))
	}
}

// buildModel returns the slots of the model it builds and leaves the ones
// it was given alone: until the plan is carried out, they are what
// HAProxy runs.
func TestBuildModelLeavesSlotsAlone(t *testing.T) {
	s := testSidecar(t, nil)
	slots := map[string][]string{"api": {"10.0.0.1:1", "10.0.0.1:2", "", ""}, "gone": {"10.0.0.9:1", "", "", ""}}
	before := map[string][]string{}
	for k, v := range slots {
		before[k] = slices.Clone(v)
	}
	model, next := s.buildModel(testSnapshot("LEAF", "ROOT", 2, 3), "unix@/run/spoa.sock", slots)
	if !reflect.DeepEqual(slots, before) {
		t.Fatalf("buildModel changed the slots it was given: %v, was %v", slots, before)
	}
	if want := map[string][]string{"api": {"10.0.0.1:3", "10.0.0.1:2", "", ""}}; !reflect.DeepEqual(next, want) {
		t.Fatalf("new slots %v, want %v (2 in place, 3 in 1's slot, the gone upstream dropped)", next, want)
	}
	up := model.Upstreams[0]
	if up.Servers[1] != (render.Server{Name: "s2", Addr: "10.0.0.1", Port: 2}) || up.PeerURI != "spiffe://"+testTD+"/ns/default/dc/dc1/svc/api" {
		t.Fatalf("upstream %+v", up)
	}
	if s.applied.slots != nil {
		t.Fatalf("the applier's slots changed: %v", s.applied.slots)
	}
}
