package sidecar

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	dto "github.com/prometheus/client_model/go"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/plugin/chain"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// testPlan compiles one of plugin/chain's testdata chains (Consul
// 1.16.3's answers).
func testPlan(t *testing.T, name string) *chain.Plan {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "chain", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	ans := readChain(consulwatch.RawChain{Body: b})
	if ans.plan == nil {
		t.Fatalf("%s: %v", name, ans.refused)
	}
	return ans.plan
}

const (
	v1     = "v1.api.default.default.dc1"
	v2     = "v2.api.default.default.dc1"
	backup = "api-backup.default.default.dc1"
)

// router-splitter-failover.json: /admin to v2 (PrefixRewrite, retries,
// 2s), header x-debug to v2, the rest 80 v1 / 20 v2; each subset fails
// over to api-backup; ring_hash on x-user; ConnectTimeout 3s,
// RequestTimeout 10s.
func TestConvertPlan(t *testing.T) {
	routes, targets, approx := convertPlan(testPlan(t, "router-splitter-failover.json"))
	if len(routes) != 3 {
		t.Fatalf("routes: %+v", routes)
	}
	admin := routes[0]
	if admin.Match == nil || admin.Match.PathPrefix != "/admin" || admin.PrefixRewrite != "/" || admin.RewriteFrom != "/admin" ||
		admin.RequestTimeoutMS != 2000 || admin.Retry.NumRetries != 2 ||
		!reflect.DeepEqual(admin.Splits, []render.Split{{Weight: chain.TotalWeight, Targets: []string{v2, backup}}}) {
		t.Errorf("route 0: %+v", admin)
	}
	// One split to a resolver, no timeout of its own: the resolver's.
	if routes[1].RequestTimeoutMS != 10000 {
		t.Errorf("route 1 request timeout %d, want the resolver's 10000", routes[1].RequestTimeoutMS)
	}
	last := routes[2]
	if last.Match != nil || last.RequestTimeoutMS != 0 || len(last.Splits) != 2 ||
		last.Splits[0].Weight != 8000 || !reflect.DeepEqual(last.Splits[0].Targets, []string{v1, backup}) ||
		last.Splits[1].Weight != 2000 || last.Splits[1].RequestHeaders.Set["x-canary"] != "1" {
		t.Errorf("route 2: %+v", last)
	}
	// A split's resolver timeout is not the route's (Envoy's way): said.
	if len(approx) != 2 || !strings.Contains(approx[0].String(), "RequestTimeout") {
		t.Errorf("approximations: %v", approx)
	}
	var ids []string
	for _, tg := range targets {
		ids = append(ids, tg.ID)
	}
	if !reflect.DeepEqual(ids, []string{backup, v1, v2}) {
		t.Fatalf("targets %v, want sorted by ID", ids)
	}
	ring := chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "header", Name: "x-user"}}}
	if tg := targets[2]; tg.ConnectTimeoutMS != 3000 || !reflect.DeepEqual(tg.Balance, ring) ||
		!strings.HasPrefix(tg.SNI, "v2.api.default.dc1.internal.") {
		t.Errorf("target v2: %+v", tg)
	}
	if tg := targets[0]; tg.ConnectTimeoutMS != 5000 || !reflect.DeepEqual(tg.Balance, ring) {
		t.Errorf("failover target: %+v", tg)
	}
}

// A TCP chain (redirect db -> db-v2, failover to db-v3) is one route,
// one split, two targets in failover order.
func TestConvertTCPPlan(t *testing.T) {
	routes, targets, _ := convertPlan(testPlan(t, "tcp-redirect-failover.json"))
	if len(routes) != 1 || routes[0].Match != nil || len(routes[0].Splits) != 1 ||
		!reflect.DeepEqual(routes[0].Splits[0].Targets, []string{"db-v2.default.default.dc1", "db-v3.default.default.dc1"}) {
		t.Fatalf("routes: %+v", routes)
	}
	if len(targets) != 2 || targets[0].Balance.Algorithm != "leastconn" || targets[0].ConnectTimeoutMS != 2000 {
		t.Errorf("targets: %+v", targets)
	}
}

// A TCP plan takes no request timeout from its resolver and hashes only
// on the source address (a connection has no headers).
func TestConvertTCPPlanDropsHTTPSettings(t *testing.T) {
	p := testPlan(t, "tcp-redirect-failover.json")
	sp := &p.Routes[0].Splits[0]
	sp.Resolver.RequestTimeout = 3 * time.Second
	sp.Resolver.Balance = chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "header", Name: "x-user"}, {Kind: "source_ip"}}}
	routes, targets, approx := convertPlan(p)
	if routes[0].RequestTimeoutMS != 0 {
		t.Errorf("a TCP route got a request timeout: %d", routes[0].RequestTimeoutMS)
	}
	if b := targets[0].Balance; !reflect.DeepEqual(b, chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "source_ip"}}}) {
		t.Errorf("TCP balance %+v, want the source address alone", b)
	}
	if len(approx) != 2 || !strings.Contains(approx[0].String(), "header x-user") {
		t.Errorf("approximations %v", approx)
	}
	sp.Resolver.Balance.Keys = sp.Resolver.Balance.Keys[:1]
	if _, targets, _ := convertPlan(p); targets[0].Balance.Algorithm != "random" {
		t.Errorf("TCP balance on a header alone: %+v, want random", targets[0].Balance)
	}
}

// chainSnapshot is testSnapshot with api routed by the chain.
func chainSnapshot(t *testing.T, targetPorts map[string][]int) snapshot {
	snap := testSnapshot("LEAF", "ROOT", 1, 2)
	p := testPlan(t, "router-splitter-failover.json")
	snap.chains = map[string]chainAnswer{"api": {plan: p}}
	snap.targetEndpoints = map[string][]endpoint{}
	for id, ports := range targetPorts {
		snap.targetEndpoints[targetKey(p.Targets[id])] = eps(ports...)
	}
	return snap
}

// Each target backend has slots of its own, kept across renders while
// its instances stay; its identity is its own service's; the upstream's
// own slots are kept (for a return to the default chain) but not served.
func TestChainSlotsPerTarget(t *testing.T) {
	s := testSidecar(t, nil)
	snap := chainSnapshot(t, map[string][]int{v1: {11, 12}, v2: {21}, backup: {31}})
	snap.use = chooseChains(snap, nil)
	m, slots := s.buildModel(snap, "unix@/run/spoa.sock", nil)
	api := m.Upstreams[0]
	if len(api.Routes) != 3 || len(api.Targets) != 3 || api.Servers != nil {
		t.Fatalf("api: %d routes, %d targets, servers %v", len(api.Routes), len(api.Targets), api.Servers)
	}
	if !reflect.DeepEqual(slots["api"], []string{"10.0.0.1:1", "10.0.0.1:2", "", ""}) {
		t.Errorf("the upstream's own slots: %v", slots["api"])
	}
	byID := map[string]render.Target{}
	for _, tg := range api.Targets {
		byID[tg.ID] = tg
	}
	if got := byID[backup].PeerURI; got != "spiffe://"+testTD+"/ns/default/dc/dc1/svc/api-backup" {
		t.Errorf("the failover target's identity %q: it follows the target's service", got)
	}
	if got := byID[v1].PeerURI; got != "spiffe://"+testTD+"/ns/default/dc/dc1/svc/api" {
		t.Errorf("v1's identity %q", got)
	}
	if s1 := byID[v1].Servers; len(s1) != 4 || s1[0] != (render.Server{Name: "s1", Addr: "10.0.0.1", Port: 11}) ||
		s1[1].Port != 12 || s1[2].Addr != "" {
		t.Errorf("v1's servers: %+v", s1)
	}
	if k := targetSlotKey("api", v1); !reflect.DeepEqual(slots[k], []string{"10.0.0.1:11", "10.0.0.1:12", "", ""}) {
		t.Errorf("v1's slots %v", slots[k])
	}

	// v1's first instance leaves, a third comes: the second keeps its
	// slot, and the change is runtime commands on v1's backend only.
	next := chainSnapshot(t, map[string][]int{v1: {12, 13}, v2: {21}, backup: {31}})
	next.use = chooseChains(next, nil)
	m2, slots2 := s.buildModel(next, "unix@/run/spoa.sock", slots)
	if k := targetSlotKey("api", v1); !reflect.DeepEqual(slots2[k], []string{"10.0.0.1:13", "10.0.0.1:12", "", ""}) {
		t.Errorf("v1's slots after churn %v: 12 must keep slot 2", slots2[k])
	}
	cmds := serverCommands(m, m2)
	backend := m2.Upstreams[0].TargetBackend(v1)
	want := []haproxy.Command{haproxy.SetServerState(backend, "s1", haproxy.ServerMaint), haproxy.SetServerAddr(backend, "s1", "10.0.0.1", 13),
		haproxy.SetServerState(backend, "s1", haproxy.ServerReady), haproxy.SetServerHealth(backend, "s1", haproxy.HealthUp)}
	if !reflect.DeepEqual(cmds, want) {
		t.Errorf("commands %v, want %v", cmds, want)
	}
	if !sameSlots(m, m2) {
		t.Error("same targets and slot counts reported as different")
	}
}

// Limits are shared over each target backend's instances (Envoy applies
// an upstream's limits to each cluster of its chain).
func TestChainTargetLimits(t *testing.T) {
	s := testSidecar(t, nil)
	snap := chainSnapshot(t, map[string][]int{v1: {11, 12}, v2: {21}, backup: nil})
	snap.reg.Upstreams[0].Limits = &render.Limits{Concurrent: 4}
	snap.use = chooseChains(snap, nil)
	m, _ := s.buildModel(snap, "unix@/run/spoa.sock", nil)
	for _, tg := range m.Upstreams[0].Targets {
		var got []int
		for _, srv := range tg.Servers {
			got = append(got, srv.MaxConn)
		}
		want := map[string][]int{v1: {2, 2, 0, 0}, v2: {4, 0, 0, 0}, backup: {0, 0, 0, 0}}[tg.ID]
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s maxconn %v, want %v", tg.ID, got, want)
		}
	}
}

// A refused chain keeps what the upstream was served with; refused with
// nothing before, the upstream has no instances. The refusal is logged
// once per distinct text, naming the settings, and counted.
func TestChainRefusal(t *testing.T) {
	p := testPlan(t, "router-splitter-failover.json")
	// Consul's answer for a router with RetryOn "cancelled" (plugin/chain's
	// testdata), which HAProxy cannot honour.
	b, err := os.ReadFile(filepath.Join("..", "chain", "testdata", "router-matches.json"))
	if err != nil {
		t.Fatal(err)
	}
	ans := readChain(consulwatch.RawChain{Body: b})
	if !chain.IsRefused(ans.refused) {
		t.Fatalf("answer %+v, want refused", ans)
	}
	snap := testSnapshot("LEAF", "ROOT", 1)
	snap.chains = map[string]chainAnswer{"api": ans}

	if got := chooseChains(snap, map[string]chainUse{"api": {plan: p}})["api"]; got.plan != p || got.closed {
		t.Errorf("refused after a served chain: %+v, want that chain kept", got)
	}
	if got := chooseChains(snap, map[string]chainUse{"api": {}})["api"]; got.plan != nil || got.closed {
		t.Errorf("refused after the default path: %+v, want the default kept", got)
	}
	first := chooseChains(snap, nil)
	if !first["api"].closed {
		t.Fatalf("refused with nothing before: %+v, want closed", first["api"])
	}
	s := testSidecar(t, nil)
	var logged strings.Builder
	s.log = hclog.New(&hclog.LoggerOptions{Output: &logged})
	s.applier.log = s.log
	snap.use = first
	m, _ := s.buildModel(snap, "unix@/run/spoa.sock", nil)
	for _, srv := range m.Upstreams[0].Servers {
		if srv.Addr != "" {
			t.Errorf("a closed upstream has an instance: %+v", srv)
		}
	}
	s.logChains(snap, first)
	s.logChains(snap, first)
	if n := strings.Count(logged.String(), "discovery chain refused"); n != 1 ||
		!strings.Contains(logged.String(), "Routes[2].Destination.RetryOn") {
		t.Errorf("logged %d times:\n%s", n, logged.String())
	}
	var counted dto.Metric
	if err := s.metrics.chainRefusals.Write(&counted); err != nil {
		t.Fatal(err)
	}
	if n := counted.GetCounter().GetValue(); n != 1 {
		t.Errorf("chain_refusals_total %v, want 1", n)
	}

	// Approximations are logged once at Warn.
	snap.chains["api"] = chainAnswer{plan: p}
	use := chooseChains(snap, nil)
	s.logChains(snap, use)
	s.logChains(snap, use)
	if n := strings.Count(logged.String(), "[WARN]  discovery chain served in HAProxy's closest terms"); n != 1 {
		t.Errorf("approximations logged %d times:\n%s", n, logged.String())
	}
}

// A default chain, or one never read, keeps today's path: no routes.
func TestDefaultChainKeepsTodaysPath(t *testing.T) {
	s := testSidecar(t, nil)
	for name, chains := range map[string]map[string]chainAnswer{
		"default": {"api": {def: true}}, "unread": {}} {
		snap := testSnapshot("LEAF", "ROOT", 1)
		snap.chains = chains
		snap.use = chooseChains(snap, nil)
		m, _ := s.buildModel(snap, "unix@/run/spoa.sock", nil)
		if u := m.Upstreams[0]; u.Routes != nil || u.Targets != nil || u.Servers[0].Port != 1 {
			t.Errorf("%s: %+v", name, u)
		}
	}
	if ans := readChain(consulwatch.RawChain{Default: true, Body: []byte("not even JSON")}); !ans.def {
		t.Error("a default chain is compiled")
	}
	if ans := readChain(consulwatch.RawChain{Body: []byte(`{"Chain":{"Nope":1}}`)}); ans.refused == nil || chain.IsRefused(ans.refused) {
		t.Error("an unreadable chain is not refused (as a decoding error, not a setting)")
	}
}

// A chain's targets are waited for as an upstream's instances are: the
// snapshot misses them until their watch answers, fails, or the grace
// passes; the targets of the chain in use count too.
func TestChainTargetsWaitedFor(t *testing.T) {
	w := newWatched()
	w.reg = &proxyConfig{Service: "web", Upstreams: []render.Upstream{{Name: "api"}}}
	w.leaf, w.roots = &api.LeafCert{}, &api.CARootList{}
	w.endpoints["api"] = eps(1)
	w.watching["api"] = &upstreamWatch{status: consulwatch.NewStatus(), started: time.Now()}
	w.chainWatching["api"] = &chainWatch{upstreamWatch: &upstreamWatch{status: consulwatch.NewStatus(), started: time.Now()}}
	if snap := w.snapshot(); !reflect.DeepEqual(snap.missing, []string{"discovery chain of api"}) {
		t.Fatalf("missing %v, want the chain", snap.missing)
	}
	p := testPlan(t, "tcp-redirect-failover.json")
	w.chains["api"] = chainAnswer{plan: p}
	for id := range p.Targets {
		w.targetWatching[targetKey(p.Targets[id])] = &upstreamWatch{status: consulwatch.NewStatus(), started: time.Now()}
	}
	if snap := w.snapshot(); len(snap.missing) != 2 {
		t.Fatalf("missing %v, want both targets", snap.missing)
	}
	w.targetEndpoints[targetKey(p.Targets["db-v2.default.default.dc1"])] = eps(7)
	w.targetWatching[targetKey(p.Targets["db-v3.default.default.dc1"])].started = time.Now().Add(-upstreamGrace)
	snap := w.snapshot()
	if len(snap.missing) != 0 || len(snap.unread) != 1 || !strings.Contains(snap.unread[0].key, "db-v3") {
		t.Fatalf("missing %v, unread %v: want db-v3 given up on", snap.missing, snap.unread)
	}
	if got := snap.targetEndpoints[targetKey(p.Targets["db-v2.default.default.dc1"])]; !reflect.DeepEqual(got, eps(7)) {
		t.Errorf("db-v2's instances %v", got)
	}
}

// A chain the render's Validate refuses is refused as plugin/chain's
// refusals are: the previous chain is kept (none: no instances), logged
// once and counted. Here a TCP upstream is handed an HTTP router's plan.
func TestChainRefusedByValidate(t *testing.T) {
	s := testSidecar(t, nil)
	var logged strings.Builder
	s.log = hclog.New(&hclog.LoggerOptions{Output: &logged})
	s.applier.log = s.log
	snap := chainSnapshot(t, map[string][]int{v1: {11}, v2: {21}, backup: {31}})
	snap.reg.Upstreams[0].Protocol = render.ProtocolTCP
	snap.use = chooseChains(snap, nil)
	m, _ := s.buildModel(snap, "unix@/run/spoa.sock", nil)
	if !s.refuseInvalidChains(m, &snap) || !snap.use["api"].closed {
		t.Fatalf("refused %+v, want closed (nothing before)", snap.use["api"])
	}
	if n := strings.Count(logged.String(), "discovery chain refused"); n != 1 || !strings.Contains(logged.String(), "TCP") {
		t.Errorf("logged %d times:\n%s", n, logged.String())
	}

	// With a chain served before, that one is kept.
	tcpPlan := testPlan(t, "tcp-redirect-failover.json")
	s.applied.chains = map[string]chainUse{"api": {plan: tcpPlan}}
	snap.use = chooseChains(snap, s.applied.chains)
	if !s.refuseInvalidChains(m, &snap) || snap.use["api"].plan != tcpPlan {
		t.Errorf("kept %+v, want the TCP chain served before", snap.use["api"])
	}
	var counted dto.Metric
	if err := s.metrics.chainRefusals.Write(&counted); err != nil {
		t.Fatal(err)
	}
	if n := counted.GetCounter().GetValue(); n != 2 {
		t.Errorf("chain_refusals_total %v, want 2 (two distinct outcomes)", n)
	}
}

// chainState is the state of chainSnapshot's instances, rendered.
func chainState(t *testing.T, s *Sidecar, p *chain.Plan, targetPorts map[string][]int, slots map[string][]string) appliedState {
	t.Helper()
	snap := chainSnapshot(t, targetPorts) // p's targets are the same
	snap.chains["api"] = chainAnswer{plan: p}
	snap.use = chooseChains(snap, nil)
	st := stateOf(t, s, snap, slots)
	st.chains = snap.use
	return st
}

// Through the real render: a target's instances move through the
// runtime API on that target's backend, and so does a split weight (a
// process variable); the chain going back to the default is a new shape
// (a reload).
func TestPlanChainChanges(t *testing.T) {
	s := testSidecar(t, nil)
	p := testPlan(t, "router-splitter-failover.json")
	prev := chainState(t, s, p, map[string][]int{v1: {11, 12}, v2: {21}, backup: {31}}, nil)

	moved := chainState(t, s, p, map[string][]int{v1: {12, 13}, v2: {21}, backup: {31}}, prev.slots)
	pl := planApply(true, prev, moved)
	be := moved.model.Upstreams[0].TargetBackend(v1)
	want := []haproxy.Command{haproxy.SetServerState(be, "s1", haproxy.ServerMaint), haproxy.SetServerAddr(be, "s1", "10.0.0.1", 13),
		haproxy.SetServerState(be, "s1", haproxy.ServerReady), haproxy.SetServerHealth(be, "s1", haproxy.HealthUp)}
	if pl.method != methodRuntime || !reflect.DeepEqual(pl.runtime, want) {
		t.Fatalf("a target's instance moved: plan %s %v, want runtime %v", pl.method, pl.runtime, want)
	}

	// 80/20 becomes 50/50.
	reweighed := testPlan(t, "router-splitter-failover.json")
	last := &reweighed.Routes[len(reweighed.Routes)-1]
	last.Splits[0].Weight, last.Splits[1].Weight = 5000, 5000
	pl = planApply(true, moved, chainState(t, s, reweighed, map[string][]int{v1: {12, 13}, v2: {21}, backup: {31}}, moved.slots))
	vars := pl.next.model.SplitVars()
	if len(vars) != 1 || vars[0].Value != 5000 {
		t.Fatalf("split bounds %+v, want one at 5000", vars)
	}
	if want := []haproxy.Command{haproxy.SetProcVar(vars[0].Name, 5000)}; pl.method != methodRuntime || !reflect.DeepEqual(pl.runtime, want) {
		t.Errorf("a weight change: plan %s (%s) %v, want runtime %v", pl.method, pl.reason, pl.runtime, want)
	}

	// Back to the default chain: the upstream's own instances.
	snap := testSnapshot("LEAF", "ROOT", 1, 2)
	snap.chains = map[string]chainAnswer{"api": {def: true}}
	snap.use = chooseChains(snap, moved.chains)
	pl = planApply(true, moved, stateOf(t, s, snap, moved.slots))
	if pl.method != methodReload || pl.next.model.Upstreams[0].Servers[0].Port != 1 {
		t.Errorf("back to the default: plan %s, servers %+v", pl.method, pl.next.model.Upstreams[0].Servers)
	}
}

// A chain target's host-name instances are resolved as an upstream's
// are: served on the addresses DNS gives, in the target backend's slots.
func TestChainTargetHostNames(t *testing.T) {
	s, srv := dnsSidecar(t)
	srv.Set("v2-1.mesh.test", "10.0.9.7")
	p := testPlan(t, "router-splitter-failover.json")
	tk := targetKey(p.Targets[v2])
	mk := func() snapshot {
		snap := chainSnapshot(t, map[string][]int{v1: {11}, backup: {31}})
		snap.targetEndpoints[tk] = []endpoint{{Addr: "v2-1.mesh.test", Port: 21000}}
		return snap
	}
	snap := resolvedSnapshot(t, s, mk, func(sn snapshot) bool {
		return len(sn.targetEndpoints[tk]) == 1 && sn.targetEndpoints[tk][0].Addr == "10.0.9.7"
	})
	snap.use = chooseChains(snap, nil)
	m, _ := s.buildModel(snap, "unix@/run/spoa.sock", nil)
	for _, tg := range m.Upstreams[0].Targets {
		if tg.ID == v2 && (tg.Servers[0].Addr != "10.0.9.7" || tg.Servers[0].Port != 21000) {
			t.Errorf("v2's servers %+v, want the name's address", tg.Servers)
		}
	}
}
