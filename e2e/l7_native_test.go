package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// l7Instance is an api sidecar under test: its inbound port and admin
// listener, and how it decides L7 requests.
type l7Instance struct {
	name   string
	in     *instance
	admin  string
	native bool // HAProxy matches the native sets itself
}

// TestL7NativeMatchesSPOA runs one table of requests through two api
// sidecars: one that matches the permissions natively in HAProxy (the
// default; after a connection's first request, in local_app_l7, which has
// no SPOE filter) and one that sends every L7 request to its SPOA
// (-spoa-only-l7).
// Both must give every request the answer Consul's semantics give it, and
// count it under the same permission: the native sidecar in
// haconnect_l7_requests_total, without asking its SPOA, the other in
// haconnect_spoa_l7_requests_total. A set HAProxy cannot match (a header
// test) goes to the SPOA in both. A change of intention reaches an open
// connection of the native sidecar within milliseconds.
func TestL7NativeMatchesSPOA(t *testing.T) {
	m := newMesh(t)
	m.consul.SetProtocol(t, "api", "http")
	roots, _ := m.consul.RootsPEM(t)
	leaves := map[string]*harness.Leaf{}
	for _, svc := range []string{"web", "fresh", "batch"} {
		leaves[svc] = m.consul.IssueLeaf(t, svc)
	}
	var sidecars []*l7Instance
	// The first group's intentions are in before the sidecars start: its
	// set must be loaded from the first answer, with no change after.
	m.consul.SetIntentions(t, "api", l7NativeGroups()[0].sources...)
	for _, native := range []bool{true, false} {
		admin := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
		// Decisions fresh for the whole test on the native sidecar: every
		// request after a connection's first is matched in local_app_l7,
		// and a change of intention can only reach an open connection
		// through the maps.
		args := []string{"-admin-bind", admin, "-ttl", "10m"}
		name := "api-native"
		if !native {
			args, name = append(args, "-spoa-only-l7"), "api-spoa"
		}
		in := m.addInstance(&instance{id: name, args: args}, "api")
		sidecars = append(sidecars, &l7Instance{name: name, in: in, admin: admin, native: native})
	}
	dial := func(s *l7Instance, caller string) *keepAlive {
		t.Helper()
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.in.port), harness.ClientTLS(leaves[caller], roots))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return &keepAlive{conn: conn, r: bufio.NewReader(conn)}
	}
	count := func(s *l7Instance, family string, c l7Case) float64 {
		t.Helper()
		if mt := find(scrape(t, s.admin)[family], l7Labels(c)); mt != nil {
			return mt.GetCounter().GetValue()
		}
		return 0
	}

	groups := l7NativeGroups()
	for i, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			if i > 0 { // the first group's are in since the start
				m.consul.SetIntentions(t, "api", g.sources...)
			}
			first := g.cases[0]
			for _, s := range sidecars {
				// The new intentions are in, and on the native sidecar
				// the set is loaded in HAProxy's maps (the first case is
				// counted natively).
				family := "haconnect_spoa_l7_requests_total"
				if s.native && g.native {
					family = "haconnect_l7_requests_total"
				}
				harness.WaitFor(t, 10*time.Second, s.name+": intentions applied", func() bool {
					was := count(s, family, first)
					code, body := dial(s, first.caller).do(t, first.method, first.path, first.headers...)
					return matchesCase(code, body, first) && count(s, family, first) > was
				})
			}
			for _, s := range sidecars {
				natively := s.native && g.native
				before := map[string][2]float64{}
				for _, c := range g.cases {
					if c.permission != "" {
						before[l7MetricKey(c)] = [2]float64{count(s, "haconnect_l7_requests_total", c), count(s, "haconnect_spoa_l7_requests_total", c)}
					}
				}
				conns := map[string]*keepAlive{}
				want := map[string]float64{}
				l7Requests := map[string]int{} // by caller
				served := backendRequests(t, s.in)
				for _, c := range g.cases {
					if conns[c.caller] == nil {
						conns[c.caller] = dial(s, c.caller)
					}
					code, body := conns[c.caller].do(t, c.method, c.path, c.headers...)
					if !matchesCase(code, body, c) {
						t.Errorf("%s: %s %s %s %v: got %d %q, want reason %q", s.name, c.caller, c.method, c.path, c.headers, code, strings.TrimSpace(body), c.reason)
					}
					if c.permission != "" {
						want[l7MetricKey(c)]++
						l7Requests[c.caller]++
					}
				}
				if natively {
					// A connection's first request is checked in
					// local_app_check; the others skip the SPOE filter.
					wantL7 := 0
					for _, n := range l7Requests {
						wantL7 += n - 1
					}
					if got := backendRequests(t, s.in)["local_app_l7"] - served["local_app_l7"]; got != wantL7 {
						t.Errorf("%s: local_app_l7 served %d requests, want %d", s.name, got, wantL7)
					}
				}
				for _, c := range g.cases {
					key := l7MetricKey(c)
					if c.permission == "" || want[key] == 0 {
						continue
					}
					gotNative := count(s, "haconnect_l7_requests_total", c) - before[key][0]
					gotSPOA := count(s, "haconnect_spoa_l7_requests_total", c) - before[key][1]
					wantNative, wantSPOA := 0.0, want[key]
					if natively {
						wantNative, wantSPOA = want[key], 0
					}
					if gotNative != wantNative || gotSPOA != wantSPOA {
						t.Errorf("%s: {%s}: counted %v natively and %v by the SPOA, want %v and %v", s.name, key, gotNative, gotSPOA, wantNative, wantSPOA)
					}
					want[key] = 0
				}
			}
		})
	}

	t.Run("a change of intention reaches an open connection of the native sidecar", func(t *testing.T) {
		native := sidecars[0]
		set := func(action api.IntentionAction) {
			m.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
				httpPerm(action, api.IntentionHTTPPermission{PathPrefix: "/flip"}),
				httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
			}})
		}
		set(allow)
		k := dial(native, "web")
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { code, _ := k.do(t, "GET", "/flip"); return code == 200 })
		var took []time.Duration
		for i, code := range []int{403, 200, 403, 200} {
			action := allow
			if code == 403 {
				action = deny
			}
			start := time.Now()
			set(action)
			for {
				if got, _ := k.do(t, "GET", "/flip"); got == code {
					break
				}
				if time.Since(start) > 5*time.Second {
					t.Fatalf("change %d: still not %d after 5s", i+1, code)
				}
				time.Sleep(time.Millisecond)
			}
			took = append(took, time.Since(start))
		}
		t.Logf("a change of intention reached the open connection in %v (the write to Consul included)", took)
		// The first 200 above may be the SPOA's, while the maps were
		// between the two sets; then the open connection is matched
		// natively again (the last set is the first one: the name its
		// decision carries).
		other := l7Case{caller: "web", permission: "2"}
		harness.WaitFor(t, 5*time.Second, "GET /other decided natively", func() bool {
			before := count(native, "haconnect_l7_requests_total", other)
			if code, _ := k.do(t, "GET", "/other"); code != 200 {
				t.Fatalf("GET /other: %d, want 200", code)
			}
			return count(native, "haconnect_l7_requests_total", other) == before+1
		})
	})

	t.Run("a new worker loads the current sets from their files", func(t *testing.T) {
		// The sets changed through the runtime API only; a reload's
		// worker reads the map files, which must hold them too.
		native := sidecars[0]
		m.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			httpPerm(deny, api.IntentionHTTPPermission{PathExact: "/reloaded", Methods: []string{"GET"}}),
		}})
		reloaded := l7Case{caller: "web", method: "GET", path: "/reloaded", reason: "l7_permission_deny", permission: "1"}
		harness.WaitFor(t, 5*time.Second, "the new set loaded", func() bool {
			was := count(native, "haconnect_l7_requests_total", reloaded)
			code, body := dial(native, "web").do(t, "GET", "/reloaded")
			return matchesCase(code, body, reloaded) && count(native, "haconnect_l7_requests_total", reloaded) > was
		})
		worker := workerPid(t, native.in.dir)
		if err := syscall.Kill(parentOf(t, worker), syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 10*time.Second, "a new worker", func() bool { return workerPid(t, native.in.dir) != worker })
		// The new worker's counters start at zero.
		k := dial(native, "web")
		for i := 1; i <= 3; i++ {
			if code, body := k.do(t, "GET", "/reloaded"); !matchesCase(code, body, reloaded) {
				t.Fatalf("request %d after the reload: %d %q, want denied by permission 1", i, code, body)
			}
		}
		if got := count(native, "haconnect_l7_requests_total", reloaded); got != 3 {
			t.Errorf("the new worker decided %v of 3 requests natively", got)
		}
	})
}

// l7Group is intentions for api and requests against them.
type l7Group struct {
	name    string
	sources []*api.SourceIntention
	cases   []l7Case
	native  bool // every permission can be matched natively
}

// l7NativeGroups is TestL7NativeMatchesSPOA's table.
func l7NativeGroups() []l7Group {
	return []l7Group{{
		name:   "methods, exact paths and prefixes",
		native: true,
		sources: []*api.SourceIntention{{Name: "web", Permissions: []*api.IntentionPermission{
			/* 1 */ httpPerm(deny, api.IntentionHTTPPermission{PathExact: "/admin"}),
			/* 2 */ httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/api/", Methods: []string{"GET", "HEAD"}}),
			/* 3 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/api/"}),
			/* 4 */ httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/api/public"}),
			/* 5 */ httpPerm(allow, api.IntentionHTTPPermission{PathExact: "/upload", Methods: []string{"POST"}}),
			/* 6 */ httpPerm(deny, api.IntentionHTTPPermission{PathExact: "/upload"}),
			/* 7 */ httpPerm(allow, api.IntentionHTTPPermission{Methods: []string{"GET"}}),
			/* 8 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/x"}),
		}}},
		cases: []l7Case{
			{caller: "web", method: "GET", path: "/admin", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/admin?debug=1", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "//admin", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/api/../admin", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "POST", path: "/%61dmin", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/admin/", permission: "7"},
			{caller: "web", method: "POST", path: "/admin/", permission: "none"},
			{caller: "web", method: "GET", path: "/api/users", permission: "2"},
			{caller: "web", method: "HEAD", path: "/api/users", permission: "2"},
			{caller: "web", method: "DELETE", path: "/api/users", reason: "l7_permission_deny", permission: "3"},
			// /api/public is listed after /api/, which decides first.
			{caller: "web", method: "POST", path: "/api/public/x", reason: "l7_permission_deny", permission: "3"},
			{caller: "web", method: "GET", path: "/api/public", permission: "2"},
			{caller: "web", method: "POST", path: "/api", permission: "none"},
			{caller: "web", method: "POST", path: "/upload", permission: "5"},
			{caller: "web", method: "PUT", path: "/upload", reason: "l7_permission_deny", permission: "6"},
			{caller: "web", method: "GET", path: "/upload", reason: "l7_permission_deny", permission: "6"},
			{caller: "web", method: "POST", path: "/upload/", permission: "none"},
			{caller: "web", method: "GET", path: "/API/users", permission: "7"},
			{caller: "web", method: "PATCH", path: "/xyz", reason: "l7_permission_deny", permission: "8"},
			{caller: "web", method: "GET", path: "/xyz", permission: "7"},
			{caller: "web", method: "PURGE", path: "/elsewhere", permission: "none"},
			{caller: "web", method: "PURGE", path: "/x", reason: "l7_permission_deny", permission: "8"},
			{caller: "batch", method: "DELETE", path: "/admin"},
		},
	},
		wildcardL7Group(),
		{
			name: "a header test: the SPOA decides in both",
			sources: []*api.SourceIntention{{Name: "web", Permissions: []*api.IntentionPermission{
				httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-env", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "prod" })}),
				httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
			}}},
			cases: []l7Case{
				{caller: "web", method: "GET", path: "/h/", headers: []string{"X-Env: prod"}, reason: "l7_permission_deny", permission: "1"},
				{caller: "web", method: "GET", path: "/h/", headers: []string{"X-Env: dev"}, permission: "2"},
			},
		}}
}

// wildcardL7Group: a wildcard source with permissions, which an exact L4
// source beats (TestL7Intentions, TestL7NativeMatchesSPOA).
func wildcardL7Group() l7Group {
	return l7Group{
		name:   "a wildcard source with permissions; an exact L4 source beats it",
		native: true,
		sources: []*api.SourceIntention{
			{Name: "*", Permissions: []*api.IntentionPermission{
				httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/secret"}),
				httpPerm(allow, api.IntentionHTTPPermission{Methods: []string{"GET"}}),
				httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/"}),
			}},
			{Name: "web", Action: allow},
		},
		cases: []l7Case{
			{caller: "fresh", method: "GET", path: "/secret/x", reason: "l7_permission_deny", permission: "1"},
			{caller: "fresh", method: "GET", path: "/x", permission: "2"},
			{caller: "fresh", method: "PUT", path: "/x", reason: "l7_permission_deny", permission: "3"},
			{caller: "batch", method: "GET", path: "/secret", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/secret/x"},
		},
	}
}
