package render

import (
	"fmt"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/plugin/chain"
)

const (
	tV1     = "v1.api.default.default.dc1"
	tV2     = "v2.api.default.default.dc1"
	tBackup = "api-backup.default.default.dc1"
)

// chainModel is model() with its upstream routed by a chain using every
// feature the rendering knows: matches of every kind, a prefix rewrite,
// header modifiers on routes and splits, timeouts, retries, an 80/20
// split, failover, and each balance algorithm.
func chainModel(proto string) *Model {
	m := model()
	u := &m.Upstreams[0]
	u.Protocol = proto
	peer := func(svc string) string { return "spiffe://td.consul/ns/default/dc/dc1/svc/" + svc }
	slots := func(addr string) []Server { return []Server{{Name: "s1", Addr: addr, Port: 21000}, {Name: "s2"}} }
	u.Targets = []Target{
		{ID: tV1, PeerURI: peer("api"), SNI: "v1.api.default.dc1.internal.td.consul", ConnectTimeoutMS: 3000,
			Balance: chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "header", Name: "x-user"}}}, Servers: slots("10.0.0.1")},
		{ID: tV2, PeerURI: peer("api"), Balance: chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{
			{Kind: "header", Name: "x-user"}, {Kind: "cookie", Name: "sid"}, {Kind: "query_parameter", Name: "u"}, {Kind: "source_ip"}}},
			Servers: slots("10.0.0.2")},
		{ID: tBackup, PeerURI: peer("api-backup"), Balance: chain.Balance{Algorithm: "leastconn"}, Servers: slots("10.0.0.3")},
	}
	if !IsHTTP(proto) {
		u.Targets[0].Balance = chain.Balance{Algorithm: "hash", Keys: []chain.HashKey{{Kind: "source_ip"}}}
		u.Targets[1].Balance = chain.Balance{Algorithm: "random"}
		u.Routes = []Route{{Splits: []Split{{Weight: 10000, Targets: []string{tV1, tBackup}}}}}
		return m
	}
	u.Routes = []Route{
		{Match: &chain.Match{PathPrefix: "/admin/", Headers: []chain.HeaderMatch{
			{Name: "x-env", Exact: "it's a \"test\" $HOME"}, {Name: "x-pre", Prefix: "-a b"}, {Name: "x-suf", Suffix: "#z"},
			{Name: "x-re", Regex: `v\d+`}, {Name: "x-here", Present: true}, {Name: "x-not", Exact: "no", Invert: true}},
			Query:   []chain.QueryMatch{{Name: "q", Exact: "1"}, {Name: "r", Regex: "[a-z]+"}, {Name: "p", Present: true}},
			Methods: []string{"GET", "PUT"}},
			PrefixRewrite: "/v2/", RewriteFrom: "/admin/", RequestTimeoutMS: 1500, IdleTimeoutMS: 9000,
			Retry:           chain.Retry{NumRetries: 5, ConnectFailure: true},
			RequestHeaders:  chain.HeaderModifiers{Set: map[string]string{"x-route": "admin 100%%"}, Add: map[string]string{"x-a": "1"}, Remove: []string{"x-drop"}},
			ResponseHeaders: chain.HeaderModifiers{Set: map[string]string{"x-served-by": "admin"}},
			Splits:          []Split{{Weight: 10000, Targets: []string{tV2, tBackup}}}},
		{Match: &chain.Match{PathRegex: `/api/v[0-9]+/.*`}, Retry: chain.Retry{NumRetries: 1, StatusCodes: []int{502, 503}, EmptyResponse: true},
			Splits: []Split{{Weight: 10000, Targets: []string{tV2}}}},
		{Match: &chain.Match{PathExact: "/exact"}, Splits: []Split{{Weight: 10000, Targets: []string{tV1}}}},
		{Splits: []Split{
			{Weight: 8000, Targets: []string{tV1, tBackup}, RequestHeaders: chain.HeaderModifiers{Set: map[string]string{"x-split": "v1"}},
				ResponseHeaders: chain.HeaderModifiers{Add: map[string]string{"x-version": "1"}}},
			{Weight: 0, Targets: []string{tBackup}},
			{Weight: 2000, Targets: []string{tV2, tBackup}, RequestHeaders: chain.HeaderModifiers{Set: map[string]string{"x-split": "v2"}}}}},
	}
	return m
}

// TestChainRendersAndPassesHAProxyCheck renders a chain using every
// feature, for each protocol, with the upstream's limits and passive
// health check, and has the real HAProxy validate it.
func TestChainRendersAndPassesHAProxyCheck(t *testing.T) {
	for _, proto := range []string{ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolTCP} {
		m := chainModel(proto)
		u := &m.Upstreams[0]
		u.Limits = &Limits{Concurrent: 5, LimitPending: true, MaxPending: 3}
		u.PassiveHealth = &PassiveHealth{MaxFailures: 4, EjectSeconds: 30, MaxEjectionPercent: 10}
		u.Targets[0].Servers[0].MaxConn = 5
		m.Inbound.Protocol = proto
		cfg := checkConfig(t, m)
		be := func(id string) string { return "upstream_api::" + id }
		want := []string{
			"use_backend %[var(txn.hc_be)]",
			// each target: its backend, its own identity, its slots, the upstream's limits and health check
			"\nbackend " + be(tV1) + "\n", "\nbackend " + be(tV2) + "\n", "\nbackend " + be(tBackup) + "\n",
			"unless { var(txn.hc_peer) -m str spiffe://td.consul/ns/default/dc/dc1/svc/api-backup }",
			"server s1 10.0.0.1:21000 maxconn 5\n", "server s1 10.0.0.3:21000\n", "timeout queue 3000ms",
			"{ queue(" + be(tV2) + ") ge 3 }", "rise 30", "#   v1.api.default.dc1.internal.td.consul",
			// failover and balance
			"{ nbsrv(" + be(tV1) + ") gt 0 }", "hash-type consistent\n", "balance leastconn\n", "timeout connect 3000ms\n",
		}
		if IsHTTP(proto) {
			want = append(want,
				// matches, in order, first match wins
				`acl hc_r0_h0 req.fhdr(x-env) -m str -- "it's a \"test\" \$HOME"`, "acl hc_r0_h1 req.fhdr(x-pre) -m beg -- '-a b'",
				"acl hc_r0_h2 req.fhdr(x-suf) -m end -- '#z'", `acl hc_r0_h3 req.fhdr(x-re) -m reg -- '^(?:v\d+)$'`,
				"acl hc_r0_h4 req.fhdr(x-here) -m found", "acl hc_r0_q1 url_param(r) -m reg -- '^(?:[a-z]+)$'", "acl hc_r0_q2 query -m reg -- '(^|&)p(=|&|$)'",
				"acl hc_r0_m method GET PUT", "acl hc_r2_path path -m str -- '/exact'",
				"http-request set-var(txn.hc_route) int(0) if hc_r0_path hc_r0_h0 hc_r0_h1 hc_r0_h2 hc_r0_h3 hc_r0_h4 hc_r0_h5f !hc_r0_h5 hc_r0_q0 hc_r0_q1 hc_r0_q2 hc_r0_m\n",
				"http-request set-var(txn.hc_route) int(3) unless { var(txn.hc_route) -m found }\n",
				// splits: one draw, cumulative weights, the weight-0 split never chosen
				"http-request set-var(txn.hc_rand) rand(10000)",
				"int(3) if { var(txn.hc_route) -m int 3 } !{ var(txn.hc_split) -m found } { var(txn.hc_rand),sub(proc.hc_w", "_3) lt 0 }\n", "    set-var proc.hc_w",
				"int(5) if { var(txn.hc_route) -m int 3 } !{ var(txn.hc_split) -m found }\n",
				// rewrite and modifiers
				`http-request replace-path '^/admin/(.*)' '/v2/\1' if { var(txn.hc_route) -m int 0 }`,
				"http-request set-header x-route 'admin 100%%' if", "http-request del-header x-drop if",
				"http-response add-header x-version '1' if { var(txn.hc_split) -m int 3 }",
				// per-route settings in the target backends
				"http-request set-timeout server 1500 if { var(txn.hc_route) -m int 0 }",
				"http-request set-timeout tunnel 9000 if { var(txn.hc_route) -m int 0 }",
				"http-request disable-l7-retry if { var(txn.hc_route) -m int 0 }",
				"retries 5\n", "retry-on conn-failure empty-response response-timeout 500 502 503 504\n",
				"balance hash req.fhdr(x-user)\n", "balance hash var(txn.hc_hkey)", "http-request set-var(txn.hc_hk1) req.cook(sid)",
			)
		} else {
			want = append(want, "balance hash src\n", "tcp-request content set-var(txn.hc_be) str("+be(tV1)+") if { nbsrv("+be(tV1)+") gt 0 }",
				"tcp-request content reject if { var(txn.hc_be) -m str "+be(tBackup)+" } { queue("+be(tBackup)+") ge 3 }")
		}
		for _, w := range want {
			if !strings.Contains(cfg, w) {
				t.Errorf("%s: the configuration lacks %q", proto, w)
			}
		}
		if strings.Contains(cfg, "\nbackend upstream_api\n") || strings.Contains(cfg, "default_backend upstream_api") {
			t.Errorf("%s: a routed upstream still has its plain backend", proto)
		}
	}
}

// TestChainShapeIgnoresTargetServerAddresses: a target's instances change
// through the runtime API (set server addr/state), never by reload.
func TestChainShapeIgnoresTargetServerAddresses(t *testing.T) {
	a, err := Render(chainModel(ProtocolHTTP))
	if err != nil {
		t.Fatal(err)
	}
	m := chainModel(ProtocolHTTP)
	m.Upstreams[0].Targets[1].Servers[1] = Server{Name: "s2", Addr: "10.0.0.9", Port: 21001}
	m.Upstreams[0].Targets[0].Servers[0].Addr = ""
	b, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	if a.Config == b.Config || a.Shape != b.Shape {
		t.Fatal("a target's instance change must change the config but not its shape")
	}
	// A new split weight is a process variable's value: the config
	// changes, its shape does not (the runtime API applies it).
	before := m.SplitVars()
	m.Upstreams[0].Routes[3].Splits[0].Weight, m.Upstreams[0].Routes[3].Splits[2].Weight = 5000, 5000
	c, _ := Render(m)
	after := m.SplitVars()
	if c.Shape != b.Shape || c.Config == b.Config {
		t.Fatal("a new split weight must change the config but not its shape")
	}
	if len(before) != 1 || len(after) != 1 || before[0].Name != after[0].Name || before[0].Value != 8000 || after[0].Value != 5000 {
		t.Fatalf("split variables %+v -> %+v, want one bound 8000 -> 5000", before, after)
	}
	if !strings.Contains(c.Config, "set-var "+after[0].Name+" int(5000)\n") {
		t.Fatal("the global section does not set the new bound")
	}
}

func TestValidateRefusesBadChains(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto string
		edit  func(*Upstream)
		want  string
	}{
		{"routes without targets", "http", func(u *Upstream) { u.Targets = nil }, "routes without chain targets"},
		{"targets without routes", "http", func(u *Upstream) { u.Routes = nil }, "targets without routes"},
		{"unknown target", "http", func(u *Upstream) { u.Routes[1].Splits[0].Targets = []string{"v3.api.default.default.dc1"} }, `target "v3.api.default.default.dc1" is not among`},
		{"weights", "http", func(u *Upstream) { u.Routes[3].Splits[0].Weight = 7999 }, "add up to 9999, not 10000"},
		{"negative weight", "http", func(u *Upstream) { u.Routes[3].Splits[1].Weight = -1 }, "weight -1"},
		{"no split", "http", func(u *Upstream) { u.Routes[2].Splits = nil }, "route 2 has no split"},
		{"target twice", "http", func(u *Upstream) { u.Targets = append(u.Targets, u.Targets[0]) }, "listed twice"},
		{"target ID breaking the name", "http", func(u *Upstream) { u.Targets[0].ID = "v1 api"; u.Routes[2].Splits[0].Targets[0] = "v1 api" }, "not a target ID"},
		{"target ID with ::", "http", func(u *Upstream) { u.Targets[0].ID = "a::b" }, "not a target ID"},
		{"target peer URI", "http", func(u *Upstream) { u.Targets[2].PeerURI = "spiffe://td/x y" }, "peer URI"},
		{"target instance", "http", func(u *Upstream) { u.Targets[0].Servers[0].Addr = "api.local" }, "not an IP address"},
		{"last route with a match", "http", func(u *Upstream) { u.Routes = u.Routes[:3] }, "last route must match every request"},
		{"regex", "http", func(u *Upstream) { u.Routes[1].Match.PathRegex = "(" }, "not an RE2 regular expression"},
		{"newline in a value", "http", func(u *Upstream) { u.Routes[0].Match.Headers[0].Exact = "a\n    server evil 1.2.3.4:80" }, "control character"},
		{"header name", "http", func(u *Upstream) { u.Routes[0].Match.Headers[0].Name = "x-a)" }, "not a header name"},
		{"header match of no kind", "http", func(u *Upstream) { u.Routes[0].Match.Headers[0].Exact = "" }, "exactly one of Present"},
		{"too many conditions for one rule", "http", func(u *Upstream) {
			for i := range 30 {
				u.Routes[1].Match.Headers = append(u.Routes[1].Match.Headers, chain.HeaderMatch{Name: fmt.Sprintf("x-%d", i), Present: true})
			}
		}, "more than one HAProxy rule can hold"},
		{"method", "http", func(u *Upstream) { u.Routes[0].Match.Methods = []string{"GET PUT"} }, `method "GET PUT"`},
		{"Envoy variable", "http", func(u *Upstream) { u.Routes[0].RequestHeaders.Set["x-ip"] = "%DOWNSTREAM_REMOTE_ADDRESS%" }, "Envoy variable"},
		{"modifier name", "http", func(u *Upstream) { u.Routes[3].Splits[0].RequestHeaders.Set["a b"] = "1" }, `header name "a b"`},
		{"rewrite without prefix", "http", func(u *Upstream) { u.Routes[0].RewriteFrom = "" }, "without the path prefix"},
		{"rewrite with a backslash", "http", func(u *Upstream) { u.Routes[0].PrefixRewrite = `/a\1` }, "prefix rewrite"},
		{"retry status", "http", func(u *Upstream) { u.Routes[1].Retry.StatusCodes = []int{409} }, "retry on status 409"},
		{"balance", "http", func(u *Upstream) { u.Targets[0].Balance.Algorithm = "maglev" }, `balance "maglev"`},
		{"hash without keys", "http", func(u *Upstream) { u.Targets[0].Balance.Keys = nil }, "hash balance without keys"},
		{"TCP hash on a header", "tcp", func(u *Upstream) {
			u.Targets[0].Balance.Keys = []chain.HashKey{{Kind: "header", Name: "x-user"}}
		}, "in a TCP upstream"},
		{"TCP with two routes", "tcp", func(u *Upstream) { u.Routes = append(u.Routes, u.Routes[0]) }, "a TCP chain has one route"},
		{"TCP with a match", "tcp", func(u *Upstream) { u.Routes[0].Match = &chain.Match{PathPrefix: "/a"} }, "a TCP route has no match"},
		{"TCP with a timeout", "tcp", func(u *Upstream) { u.Routes[0].RequestTimeoutMS = 5 }, "a TCP route has no match"},
	} {
		m := chainModel(tc.proto)
		tc.edit(&m.Upstreams[0])
		if _, err := Render(m); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one mentioning %q", tc.name, err, tc.want)
		}
	}
	// A second upstream's backend may not take a target backend's name.
	m := chainModel(ProtocolHTTP)
	if _, err := Render(m); err != nil {
		t.Fatalf("the valid chain: %v", err)
	}
}
