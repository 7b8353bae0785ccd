package chain

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The testdata files are Consul 1.16.3's answers to /v1/discovery-chain,
// taken from a dev agent after writing the config entries each test names.

func compileFile(t *testing.T, name string) (*Plan, error) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return Compile(b)
}

// service-defaults api (http); service-resolver api: subsets v1, v2
// (OnlyPassing), DefaultSubset v1, failover to api-backup, ring_hash on
// header x-user, ConnectTimeout 3s, RequestTimeout 10s; service-splitter
// 80 v1 / 20 v2 (setting x-canary on v2); service-router: /admin to v2
// with PrefixRewrite "/" and retries, header x-debug: 1 to v2.
func TestRouterSplitterFailover(t *testing.T) {
	p, err := compileFile(t, "router-splitter-failover.json")
	if err != nil {
		t.Fatal(err)
	}
	if p.Service != "api" || p.Protocol != "http" || len(p.Routes) != 3 {
		t.Fatalf("plan: %+v", p)
	}
	ring := Balance{Algorithm: "hash", Keys: []HashKey{{Kind: "header", Name: "x-user"}}}
	v1 := Resolver{Targets: []string{"v1.api.default.default.dc1", "api-backup.default.default.dc1"},
		ConnectTimeout: 3 * time.Second, RequestTimeout: 10 * time.Second, Balance: ring}
	v2 := v1
	v2.Targets = []string{"v2.api.default.default.dc1", "api-backup.default.default.dc1"}

	admin := p.Routes[0]
	want := Route{Match: &Match{PathPrefix: "/admin"}, PrefixRewrite: "/", RewriteFrom: "/admin", RequestTimeout: 2 * time.Second,
		Retry:  Retry{NumRetries: 2, ConnectFailure: true, StatusCodes: []int{503}},
		Splits: []Split{{Weight: TotalWeight, Resolver: v2}}}
	if !reflect.DeepEqual(admin, want) {
		t.Errorf("route 0:\n got %+v\nwant %+v", admin, want)
	}
	if m := p.Routes[1].Match; m == nil || !reflect.DeepEqual(m.Headers, []HeaderMatch{{Name: "x-debug", Exact: "1"}}) {
		t.Errorf("route 1 match: %+v", m)
	}
	last := p.Routes[2]
	if last.Match != nil {
		t.Errorf("the catch-all route has a match: %+v", last.Match)
	}
	if len(last.Splits) != 2 || last.Splits[0].Weight != 8000 || last.Splits[1].Weight != 2000 ||
		!reflect.DeepEqual(last.Splits[0].Resolver, v1) || !reflect.DeepEqual(last.Splits[1].Resolver, v2) {
		t.Errorf("splits: %+v", last.Splits)
	}
	if got := last.Splits[1].RequestHeaders.Set["x-canary"]; got != "1" {
		t.Errorf("the v2 split's request header: %q", got)
	}
	tv2 := p.Targets["v2.api.default.default.dc1"]
	if tv2.Service != "api" || tv2.Subset != "v2" || tv2.Filter != "Service.Meta.version == v2" || !tv2.OnlyPassing ||
		tv2.Datacenter != "dc1" || !strings.HasPrefix(tv2.SNI, "v2.api.default.dc1.internal.") {
		t.Errorf("target v2: %+v", tv2)
	}
	if b := p.Targets["api-backup.default.default.dc1"]; b.Service != "api-backup" || b.Filter != "" || b.ConnectTimeout != 5*time.Second {
		t.Errorf("failover target: %+v", b)
	}
	if len(p.Approximations) != 0 {
		t.Errorf("approximations: %v", p.Approximations)
	}
}

// No config entry: one route, one split, the service itself.
func TestDefaultChain(t *testing.T) {
	p, err := compileFile(t, "default-tcp.json")
	if err != nil {
		t.Fatal(err)
	}
	if p.Protocol != "tcp" || len(p.Routes) != 1 || p.Routes[0].Match != nil || len(p.Routes[0].Splits) != 1 {
		t.Fatalf("plan: %+v", p)
	}
	r := p.Routes[0].Splits[0].Resolver
	if !reflect.DeepEqual(r.Targets, []string{"plain.default.default.dc1"}) || r.Balance.Algorithm != "roundrobin" {
		t.Errorf("resolver: %+v", r)
	}
}

// service-resolver db redirects to db-v2, which fails over to db-v3 with
// least_request: Consul resolves the redirect, the target is db-v2.
func TestRedirectAndFailoverTCP(t *testing.T) {
	p, err := compileFile(t, "tcp-redirect-failover.json")
	if err != nil {
		t.Fatal(err)
	}
	r := p.Routes[0].Splits[0].Resolver
	if p.Service != "db" || !reflect.DeepEqual(r.Targets, []string{"db-v2.default.default.dc1", "db-v3.default.default.dc1"}) ||
		r.Balance.Algorithm != "leastconn" || r.ConnectTimeout != 2*time.Second {
		t.Errorf("plan %+v, resolver %+v", p, r)
	}
	if p.Targets["db-v2.default.default.dc1"].Service != "db-v2" {
		t.Error("the redirect's target is not db-v2")
	}
}

// A chain compiled for another datacenter targets it.
func TestOtherDatacenter(t *testing.T) {
	p, err := compileFile(t, "other-dc.json")
	if err != nil {
		t.Fatal(err)
	}
	tg := p.Targets[p.Routes[0].Splits[0].Resolver.Targets[0]]
	if tg.Datacenter != "dc2" || !strings.Contains(tg.SNI, ".dc2.internal.") {
		t.Errorf("target: %+v", tg)
	}
}

// service-router web: an exact path with methods and header modifiers; a
// regex path with query matches, RetryOn 5xx and connect-failure and an
// IdleTimeout; header matches of every kind with RetryOn cancelled, which
// HAProxy cannot honour: the chain is refused, naming it.
func TestRouterMatchesAndRefusal(t *testing.T) {
	_, err := compileFile(t, "router-matches.json")
	if !IsRefused(err) || !strings.Contains(err.Error(), "Routes[2].Destination.RetryOn = cancelled") {
		t.Fatalf("err %v, want the RetryOn cancelled refused", err)
	}
	if strings.Contains(err.Error(), "Routes[1]") {
		t.Errorf("route 1 is servable, but: %v", err)
	}

	// Without the refused condition, the rest is served.
	b, _ := os.ReadFile(filepath.Join("testdata", "router-matches.json"))
	fixed := strings.Replace(string(b), `"cancelled"`, `"gateway-error"`, 1)
	p, err := Compile([]byte(fixed))
	if err != nil {
		t.Fatal(err)
	}
	r0 := p.Routes[0]
	if r0.Match.PathExact != "/exact" || !reflect.DeepEqual(r0.Match.Methods, []string{"GET", "HEAD"}) ||
		r0.RequestHeaders.Add["x-a"] != "1" || !reflect.DeepEqual(r0.RequestHeaders.Remove, []string{"x-b"}) ||
		r0.ResponseHeaders.Set["x-c"] != "2" {
		t.Errorf("route 0: %+v %+v", r0, r0.Match)
	}
	r1 := p.Routes[1]
	if r1.Match.PathRegex != "/re/[0-9]+" || len(r1.Match.Query) != 3 || r1.IdleTimeout != 7*time.Second ||
		!r1.Retry.ConnectFailure || !reflect.DeepEqual(r1.Retry.StatusCodes, []int{500, 501, 502, 503, 504}) {
		t.Errorf("route 1: %+v %+v", r1, r1.Match)
	}
	wantHeaders := []HeaderMatch{{Name: "x-p", Prefix: "a"}, {Name: "x-s", Suffix: "z", Invert: true},
		{Name: "x-r", Regex: "b+"}, {Name: "x-present", Present: true}}
	if r2 := p.Routes[2]; !reflect.DeepEqual(r2.Match.Headers, wantHeaders) || !reflect.DeepEqual(r2.Retry.StatusCodes, []int{502, 503, 504}) {
		t.Errorf("route 2: %+v", r2.Match.Headers)
	}
	if len(p.Approximations) != 1 || !strings.Contains(p.Approximations[0].String(), "RetryOn = 5xx") {
		t.Errorf("approximations: %v", p.Approximations)
	}
}

// maglev on a cookie then the source address.
func TestConsistentHash(t *testing.T) {
	p, err := compileFile(t, "maglev-cookie.json")
	if err != nil {
		t.Fatal(err)
	}
	want := Balance{Algorithm: "hash", Keys: []HashKey{{Kind: "cookie", Name: "sid"}, {Kind: "source_ip"}}}
	if got := p.Routes[0].Splits[0].Resolver.Balance; !reflect.DeepEqual(got, want) {
		t.Errorf("balance %+v, want %+v", got, want)
	}
}

// What a newer Consul might add, and what cannot be served, is refused by
// name rather than dropped.
func TestRefusals(t *testing.T) {
	b, _ := os.ReadFile(filepath.Join("testdata", "router-splitter-failover.json"))
	for _, tc := range []struct{ name, from, to, want string }{
		{"unknown field", `"Protocol": "http",`, `"Protocol": "http", "NewSetting": 1,`, `field haconnect does not know: "NewSetting"`},
		{"peer target", `"Service": "api-backup",`, `"Service": "api-backup", "Peer": "east",`, "Peer = east"},
		{"mesh gateway", `"MeshGateway": {},`, `"MeshGateway": {"Mode": "local"},`, "MeshGateway.Mode = local"},
		{"status code", `503`, `409`, "RetryOnStatusCodes = 409"},
		{"generated cookie", `"Field": "header",`, `"Field": "cookie", "CookieConfig": {"TTL": "10s"},`, "CookieConfig"},
		{"bad regex", `"PathPrefix": "/admin"`, `"PathRegex": "(["`, "not an RE2 regular expression"},
		{"bad header name", `"Name": "x-debug"`, `"Name": "x debug"`, "not a header name"},
		{"failover policy", `"Targets": [`, `"Policy": {"Mode": "order-by-locality"}, "Targets": [`, "Failover.Policy.Mode = order-by-locality"},
	} {
		s := strings.Replace(string(b), tc.from, tc.to, 1)
		if s == string(b) {
			t.Fatalf("%s: %q not found", tc.name, tc.from)
		}
		_, err := Compile([]byte(s))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one naming %q", tc.name, err, tc.want)
		}
	}
}

func FuzzCompile(f *testing.F) {
	for _, name := range []string{"router-splitter-failover.json", "router-matches.json", "default-tcp.json", "maglev-cookie.json"} {
		b, _ := os.ReadFile(filepath.Join("testdata", name))
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Compile(b)
		if err != nil {
			return
		}
		for _, r := range p.Routes {
			total := 0
			for _, s := range r.Splits {
				total += s.Weight
				for _, id := range s.Resolver.Targets {
					if _, ok := p.Targets[id]; !ok {
						t.Fatalf("a split leads to unknown target %q", id)
					}
				}
			}
			if total != TotalWeight {
				t.Fatalf("a route's weights add up to %d", total)
			}
		}
	})
}
