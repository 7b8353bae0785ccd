package sidecar

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/plugin/render"
)

func decodeConfig(t *testing.T, js string) map[string]any {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal([]byte(js), &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestReadRateLimits(t *testing.T) {
	// The contract's example, and Nomad's HCL shape (blocks as lists of
	// one object).
	for name, js := range map[string]string{
		"json": `{"rate_limits": {"requests_per_second": 500, "requests_max_burst": 1000,
			"per_source": {"web": {"requests_per_second": 50, "requests_max_burst": 100}, "*": {"requests_per_second": 20, "requests_max_burst": 40}},
			"routes": [{"path_prefix": "/api/expensive", "requests_per_second": 5, "requests_max_burst": 10}],
			"connections_per_second": 100}}`,
		"nomad hcl": `{"rate_limits": [{"requests_per_second": 500, "requests_max_burst": 1000,
			"per_source": [{"web": [{"requests_per_second": 50, "requests_max_burst": 100}], "*": [{"requests_per_second": 20, "requests_max_burst": 40}]}],
			"routes": [{"path_prefix": "/api/expensive", "requests_per_second": 5, "requests_max_burst": 10}],
			"connections_per_second": 100}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			rl, err := readRateLimits(decodeConfig(t, js))
			if err != nil {
				t.Fatal(err)
			}
			want := render.RateLimits{
				Instance: &render.Budget{RequestsPerSecond: 500, RequestsMaxBurst: 1000},
				PerSource: map[string]render.Budget{"web": {RequestsPerSecond: 50, RequestsMaxBurst: 100},
					"*": {RequestsPerSecond: 20, RequestsMaxBurst: 40}},
				Routes:               []render.RouteLimit{{PathPrefix: "/api/expensive", Budget: render.Budget{RequestsPerSecond: 5, RequestsMaxBurst: 10}}},
				ConnectionsPerSecond: 100,
			}
			got, _ := json.Marshal(rl)
			exp, _ := json.Marshal(want)
			if string(got) != string(exp) {
				t.Fatalf("got %s\nwant %s", got, exp)
			}
		})
	}
	if rl, err := readRateLimits(decodeConfig(t, `{"rate_limits": {"per_source": {"web": {"requests_per_second": 2.5}}}}`)); err != nil || rl.PerSource["web"].RequestsMaxBurst != 3 {
		t.Fatalf("a burst left out is the rate rounded up: %+v, %v", rl, err)
	}
	if rl, err := readRateLimits(map[string]any{}); rl != nil || err != nil {
		t.Fatalf("no rate_limits: %+v, %v", rl, err)
	}
}

// Every invalid value is refused with the field's name.
func TestReadRateLimitsRefusesByName(t *testing.T) {
	for js, want := range map[string]string{
		`{"rate_limits": "fast"}`: "Proxy.Config.rate_limits: fast (string) is not an object",
		`{"rate_limits": {"per_source": {"web": {"requests_per_second": 10, "requests_max_burst": 5}}}}`: "Proxy.Config.rate_limits.per_source.web: requests_max_burst 5 is less than requests_per_second 10",
		`{"rate_limits": {"per_source": {"web": {"requests_per_secnd": 10}}}}`:                           "Proxy.Config.rate_limits.per_source.web.requests_per_secnd: unknown key",
		`{"rate_limits": {"routes": [{"path_prefix": "/a", "requests_per_second": "x"}]}}`:               `Proxy.Config.rate_limits.routes[0].requests_per_second: "x" is not a number`,
		`{"rate_limits": {"routes": [{"requests_per_second": 1}]}}`:                                      "Proxy.Config.rate_limits.routes[0]: exactly one of path_exact, path_prefix, path_regex",
		`{"rate_limits": {"routes": {"path_prefix": "/a"}}}`:                                             "Proxy.Config.rate_limits.routes: map[path_prefix:/a] (map[string]interface {}) is not a list",
		`{"rate_limits": {"connections_per_second": -3}}`:                                                "Proxy.Config.rate_limits.connections_per_second -3 is negative",
		`{"rate_limits": {"connections_per_second": 1.5}}`:                                               "Proxy.Config.rate_limits.connections_per_second: 1.5 is not an integer",
		`{"rate_limits": {"requests_max_burst": 10}}`:                                                    "Proxy.Config.rate_limits: requests_max_burst without requests_per_second",
		`{"rate_limits": {"requests_per_second": 0}}`:                                                    "Proxy.Config.rate_limits: requests_per_second 0 must be more than 0",
	} {
		_, err := readRateLimits(decodeConfig(t, js))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", js, err, want)
		}
	}
}

// A budget's numbers change at runtime, the tables and their counters
// kept; a new window is a new table: a reload.
func TestPlanRateLimitChanges(t *testing.T) {
	s := testSidecar(t, nil)
	snapWith := func(web render.Budget) snapshot {
		snap := testSnapshot("LEAF", "ROOT", 1)
		snap.reg.RateLimits = &render.RateLimits{PerSource: map[string]render.Budget{"web": web, "*": {RequestsPerSecond: 1, RequestsMaxBurst: 1}}}
		return snap
	}
	prev := stateOf(t, s, snapWith(render.Budget{RequestsPerSecond: 10, RequestsMaxBurst: 10}), nil)
	next := stateOf(t, s, snapWith(render.Budget{RequestsPerSecond: 20, RequestsMaxBurst: 20}), prev.slots)
	p := planApply(true, prev, next)
	if p.method != methodRuntime || len(p.runtime) != 1 || !strings.Contains(p.runtime[0].String(), "set map "+s.path("rate_limits.map")+" web 1000:20") {
		t.Fatalf("same window: plan %s %v, want one set map at runtime", p.method, p.runtime)
	}
	if got := fileNames(p.files); len(got) != 1 || got[0] != "rate_limits.map" || p.files[0].data != "* 1000:1\nweb 1000:20\n" {
		t.Fatalf("files %v %+v", got, p.files)
	}
	next = stateOf(t, s, snapWith(render.Budget{RequestsPerSecond: 10, RequestsMaxBurst: 20}), prev.slots)
	if p := planApply(true, prev, next); p.method != methodReload {
		t.Fatalf("new window: plan %s %v, want a reload", p.method, p.runtime)
	}
	snap := testSnapshot("LEAF", "ROOT", 1)
	snap.reg.RateLimits = &render.RateLimits{PerSource: map[string]render.Budget{"batch": {RequestsPerSecond: 10, RequestsMaxBurst: 10}, "*": {RequestsPerSecond: 1, RequestsMaxBurst: 1}}}
	next = stateOf(t, s, snap, prev.slots)
	p = planApply(true, prev, next)
	if p.method != methodRuntime || len(p.runtime) != 2 || !strings.HasPrefix(p.runtime[0].String(), "add map") || !strings.HasPrefix(p.runtime[1].String(), "del map") {
		t.Fatalf("a source renamed: plan %s %v, want add map then del map", p.method, p.runtime)
	}
}
