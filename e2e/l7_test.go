package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// l7Case is one request and what the permissions must make of it.
type l7Case struct {
	caller, method, path string
	headers              []string
	reason               string // "" for 200, else the reason in the 403 body
	// permission is the l7_requests_total label the request must count
	// under ("1".. or "none"); "" when no permission is evaluated.
	permission string
}

func httpPerm(action api.IntentionAction, h api.IntentionHTTPPermission) *api.IntentionPermission {
	return &api.IntentionPermission{Action: action, HTTP: &h}
}

func header(name string, set func(*api.IntentionHTTPHeaderPermission)) []api.IntentionHTTPHeaderPermission {
	h := api.IntentionHTTPHeaderPermission{Name: name}
	set(&h)
	return []api.IntentionHTTPHeaderPermission{h}
}

// TestL7Intentions checks HTTP permissions with the semantics Consul gives
// them for Envoy: every match kind, precedence between permissions and the
// default, and between intentions, wildcard sources, and how fast a change
// reaches an open connection.
func TestL7Intentions(t *testing.T) {
	s := startStandalone(t, time.Minute)
	s.consul.SetProtocol(t, "api", "http")
	top := t

	webPerms := []*api.IntentionPermission{
		/* 1 */ httpPerm(deny, api.IntentionHTTPPermission{PathExact: "/admin"}),
		/* 2 */ httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/api/", Methods: []string{"GET", "HEAD"}}),
		/* 3 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/api/"}),
		/* 4 */ httpPerm(allow, api.IntentionHTTPPermission{PathRegex: "/items/[0-9]+"}),
		/* 5 */ httpPerm(deny, api.IntentionHTTPPermission{PathRegex: "/items/.*"}),
		/* 6 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-present", func(h *api.IntentionHTTPHeaderPermission) { h.Present = true })}),
		/* 7 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-exact", func(h *api.IntentionHTTPHeaderPermission) { h.Exact = "bad" })}),
		/* 8 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-prefix", func(h *api.IntentionHTTPHeaderPermission) { h.Prefix = "evil-" })}),
		/* 9 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-suffix", func(h *api.IntentionHTTPHeaderPermission) { h.Suffix = "-evil" })}),
		/* 10 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-regex", func(h *api.IntentionHTTPHeaderPermission) { h.Regex = "[0-9]{3}" })}),
		/* 11 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-token", func(h *api.IntentionHTTPHeaderPermission) { h.Present, h.Invert = true, true })}),
		/* 12 */ httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/h/", Header: header("x-env", func(h *api.IntentionHTTPHeaderPermission) { h.Exact, h.Invert = "prod", true })}),
		/* 13 */ httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/h/"}),
	}
	tok := "X-Token: t"
	groups := []l7Group{{
		name: "match kinds",
		sources: []*api.SourceIntention{
			{Name: "web", Permissions: webPerms},
		},
		cases: []l7Case{
			{caller: "web", method: "GET", path: "/admin", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/admin?debug=1", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/admin/x", permission: "none"},
			{caller: "web", method: "GET", path: "/api/users", permission: "2"},
			{caller: "web", method: "HEAD", path: "/api/users", permission: "2"},
			{caller: "web", method: "POST", path: "/api/users", reason: "l7_permission_deny", permission: "3"},
			{caller: "web", method: "DELETE", path: "/api/users", reason: "l7_permission_deny", permission: "3"},
			{caller: "web", method: "GET", path: "/items/42", permission: "4"},
			{caller: "web", method: "GET", path: "/items/42x", reason: "l7_permission_deny", permission: "5"},
			{caller: "web", method: "GET", path: "/items/abc", reason: "l7_permission_deny", permission: "5"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok}, permission: "13"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Present: "}, reason: "l7_permission_deny", permission: "6"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Exact: bad"}, reason: "l7_permission_deny", permission: "7"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Exact: Bad"}, permission: "13"},
			// Several values are joined by "," before matching, as Envoy does.
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Exact: bad", "X-Exact: bad"}, permission: "13"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Prefix: evil-1"}, reason: "l7_permission_deny", permission: "8"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Prefix: not-evil-1"}, permission: "13"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Suffix: very-evil"}, reason: "l7_permission_deny", permission: "9"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Suffix: evil-not"}, permission: "13"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Regex: 123"}, reason: "l7_permission_deny", permission: "10"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Regex: 1234"}, permission: "13"},
			{caller: "web", method: "GET", path: "/h/", reason: "l7_permission_deny", permission: "11"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Env: dev"}, reason: "l7_permission_deny", permission: "12"},
			{caller: "web", method: "GET", path: "/h/", headers: []string{tok, "X-Env: prod"}, permission: "13"},
			{caller: "web", method: "GET", path: "/elsewhere", permission: "none"},
			// A caller without an L7 intention is decided once per connection.
			{caller: "batch", method: "DELETE", path: "/admin"},
		},
	}, {
		name: "an exact source beats a wildcard, and its unmatched requests get the default, not the wildcard",
		sources: []*api.SourceIntention{
			{Name: "web", Permissions: []*api.IntentionPermission{httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/private"})}},
			{Name: "batch", Action: allow},
			{Name: "*", Action: deny},
		},
		cases: []l7Case{
			{caller: "web", method: "GET", path: "/private/x", reason: "l7_permission_deny", permission: "1"},
			{caller: "web", method: "GET", path: "/public", permission: "none"},
			{caller: "batch", method: "GET", path: "/private/x"},
			{caller: "fresh", method: "GET", path: "/public", reason: "intention_deny"},
		},
	},
		wildcardL7Group(),
	}

	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			s.consul.SetIntentions(t, "api", g.sources...)
			first := g.cases[0]
			conns := map[string]*keepAlive{}
			conn := func(caller string) *keepAlive {
				if conns[caller] == nil {
					conns[caller] = s.dialKeepAlive(t, caller)
				}
				return conns[caller]
			}
			// Wait until the first case shows the new intentions are in.
			harness.WaitFor(t, 5*time.Second, "intentions applied", func() bool {
				code, body := s.dialKeepAlive(t, first.caller).do(t, first.method, first.path, first.headers...)
				return matchesCase(code, body, first)
			})
			before := map[string]float64{}
			for _, c := range g.cases {
				if c.permission != "" {
					key := l7MetricKey(c)
					if _, ok := before[key]; !ok {
						before[key] = s.metric(t, "haconnect_spoa_l7_requests_total", l7Labels(c))
					}
				}
			}
			want := map[string]float64{}
			for _, c := range g.cases {
				code, body := conn(c.caller).do(t, c.method, c.path, c.headers...)
				if !matchesCase(code, body, c) {
					t.Errorf("%s %s %s %v: got %d %q, want reason %q", c.caller, c.method, c.path, c.headers, code, strings.TrimSpace(body), c.reason)
				}
				if c.permission != "" {
					want[l7MetricKey(c)]++
				}
			}
			for _, c := range g.cases {
				key := l7MetricKey(c)
				if c.permission == "" || want[key] == 0 {
					continue
				}
				if got := s.metric(t, "haconnect_spoa_l7_requests_total", l7Labels(c)) - before[key]; got != want[key] {
					t.Errorf("l7_requests_total{%s}: counted %v, want %v", key, got, want[key])
				}
				want[key] = 0
			}
		})
	}

	t.Run("a change of an L7 intention reaches an open connection", func(t *testing.T) {
		set := func(action api.IntentionAction) {
			s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
				httpPerm(action, api.IntentionHTTPPermission{PathPrefix: "/flip"}),
				httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
			}})
		}
		set(allow)
		k := s.dialKeepAlive(t, "web")
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { code, _ := k.do(t, "GET", "/flip"); return code == 200 })
		var took []time.Duration
		want := []int{403, 200, 403, 200, 403, 200}
		for i, code := range want {
			action := allow
			if code == 403 {
				action = deny
			}
			start := time.Now()
			set(action)
			for {
				got, _ := k.do(t, "GET", "/flip")
				if got == code {
					break
				}
				if time.Since(start) > 5*time.Second {
					t.Fatalf("flip %d: still %d after 5s", i, got)
				}
			}
			took = append(took, time.Since(start))
		}
		slices.Sort(took)
		median := took[len(took)/2]
		t.Logf("L7 change reaches an open connection: min %v, median %v, max %v (after the write returns)", took[0], median, took[len(took)-1])
		if median > 100*time.Millisecond {
			t.Errorf("median %v, want <= 100ms", median)
		}
	})

	t.Run("SPOA down: each request of an open L7 connection is denied", func(t *testing.T) {
		s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			httpPerm(allow, api.IntentionHTTPPermission{PathPrefix: "/"}),
		}})
		k := s.dialKeepAlive(t, "web")
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { code, _ := k.do(t, "GET", "/"); return code == 200 })
		s.spoa.Kill()
		if code, body := k.do(t, "GET", "/"); code != 403 || !strings.Contains(body, "(authorization_unavailable)") {
			t.Fatalf("with the SPOA down: %d %q, want 403 authorization_unavailable", code, body)
		}
		s.startSPOA(top) // it must outlive this subtest
		harness.WaitFor(t, 10*time.Second, "allowed after the SPOA returns", func() bool { code, _ := k.do(t, "GET", "/"); return code == 200 })
	})
	t.Run("headers as large as HAProxy accepts are checked", func(t *testing.T) {
		s.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			httpPerm(allow, api.IntentionHTTPPermission{Header: header("x-ok", func(h *api.IntentionHTTPHeaderPermission) { h.Present = true })}),
			httpPerm(deny, api.IntentionHTTPPermission{PathPrefix: "/"}),
		}})
		k := s.dialKeepAlive(t, "web")
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool {
			code, body := k.do(t, "GET", "/", "X-Ok: 1")
			if code != 200 {
				t.Log(code, body)
			}
			return code == 200
		})
		big := "X-Big: " + strings.Repeat("a", 15000)
		if code, body := k.do(t, "GET", "/", big, "X-Ok: 1"); code != 200 {
			t.Fatalf("with x-ok: got %d %q, want 200", code, body)
		}
		if code, body := k.do(t, "GET", "/", big); code != 403 || !strings.Contains(body, "(l7_permission_deny)") {
			t.Fatalf("without x-ok: got %d %q, want 403 l7_permission_deny", code, body)
		}
	})
}

func matchesCase(code int, body string, c l7Case) bool {
	if c.reason == "" {
		return code == 200
	}
	return code == 403 && strings.Contains(body, "("+c.reason+")")
}

func l7Labels(c l7Case) map[string]string {
	result := "allow"
	if c.reason != "" {
		result = "deny"
	}
	source := c.caller
	if c.permission != "" && c.caller != "web" {
		source = "*"
	}
	return map[string]string{"destination": "api", "source": source, "permission": c.permission, "result": result}
}

func l7MetricKey(c l7Case) string {
	l := l7Labels(c)
	return fmt.Sprintf("source=%s,permission=%s,result=%s", l["source"], l["permission"], l["result"])
}
