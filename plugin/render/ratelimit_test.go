package render

import (
	"strings"
	"testing"
)

// sampleRateLimits is the example: every kind of budget, two
// per-source windows, a route of each kind.
func sampleRateLimits() *RateLimits {
	return &RateLimits{
		Instance: &Budget{RequestsPerSecond: 500, RequestsMaxBurst: 1000},
		PerSource: map[string]Budget{
			"web": {RequestsPerSecond: 50, RequestsMaxBurst: 100},
			"*":   {RequestsPerSecond: 20, RequestsMaxBurst: 20},
		},
		Routes: []RouteLimit{
			{PathPrefix: "/api/expensive", Budget: Budget{RequestsPerSecond: 5, RequestsMaxBurst: 10}},
			{PathExact: "/it's", Budget: Budget{RequestsPerSecond: 1, RequestsMaxBurst: 1}},
			{PathRegex: `/v[0-9]+/x$`, Budget: Budget{RequestsPerSecond: 2, RequestsMaxBurst: 2}},
		},
		ConnectionsPerSecond: 100,
	}
}

func TestRateLimitMapAndTables(t *testing.T) {
	m := model()
	m.Inbound.RateLimits = sampleRateLimits()
	m.RateLimitMapFile = "/run/x/rate_limits.map"
	want := "* 1000:20\n@connections 1000:100\n@instance 2000:1000\n@r1 2000:10\n@r2 1000:1\n@r3 1000:2\nweb 2000:100\n"
	if got := m.RateLimitMapText(); got != want {
		t.Fatalf("map:\n%s\nwant:\n%s", got, want)
	}
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"backend haconnect_callers_w1000", "backend haconnect_callers_w2000",
		"backend haconnect_limits_w1000", "backend haconnect_limits_w2000",
		`string "haconnect: rate limited (route path_prefix /api/expensive)\n"`,
		`string "haconnect: rate limited (route path_exact /it's)\n"`,
		`http-request return status 429 content-type text/plain string "haconnect: rate limited (source)\n"`,
		"acl hc_norm always_true",
	} {
		if !strings.Contains(out.Config, line) {
			t.Errorf("config lacks %q", line)
		}
	}
	// Numbers are not in the shape: a new budget with the same windows is
	// a map change, applied at runtime.
	m2 := model()
	m2.Inbound.RateLimits = sampleRateLimits()
	m2.RateLimitMapFile = m.RateLimitMapFile
	m2.Inbound.RateLimits.PerSource["web"] = Budget{RequestsPerSecond: 10, RequestsMaxBurst: 20}
	out2, err := Render(m2)
	if err != nil {
		t.Fatal(err)
	}
	if out2.Shape != out.Shape || out2.Config != out.Config {
		t.Error("a budget change within the same window changed the configuration")
	}
	if m2.RateLimitMapText() == m.RateLimitMapText() {
		t.Error("the map did not change")
	}
}

func TestRateLimitsValidate(t *testing.T) {
	for name, tc := range map[string]struct {
		rl   RateLimits
		want string
	}{
		"burst below rate": {RateLimits{Instance: &Budget{RequestsPerSecond: 10, RequestsMaxBurst: 5}}, "requests_max_burst 5 is less than requests_per_second 10"},
		"zero rate":        {RateLimits{PerSource: map[string]Budget{"web": {RequestsMaxBurst: 5}}}, "rate_limits.per_source.web: requests_per_second 0"},
		"bad source":       {RateLimits{PerSource: map[string]Budget{"we b": {RequestsPerSecond: 1, RequestsMaxBurst: 1}}}, `"we b" is not a service name`},
		"two paths":        {RateLimits{Routes: []RouteLimit{{PathExact: "/a", PathPrefix: "/b", Budget: Budget{1, 1}}}}, "exactly one of"},
		"relative":         {RateLimits{Routes: []RouteLimit{{PathPrefix: "a", Budget: Budget{1, 1}}}}, `"a" does not start with /`},
		"bad regex":        {RateLimits{Routes: []RouteLimit{{PathRegex: "(", Budget: Budget{1, 1}}}}, "not an RE2"},
		"space":            {RateLimits{Routes: []RouteLimit{{PathPrefix: "/a b", Budget: Budget{1, 1}}}}, "printable ASCII"},
		"negative conns":   {RateLimits{ConnectionsPerSecond: -1}, "connections_per_second -1"},
		"window too long":  {RateLimits{Instance: &Budget{RequestsPerSecond: 0.00001, RequestsMaxBurst: 10}}, "out of range"},
	} {
		t.Run(name, func(t *testing.T) {
			m := model()
			m.Inbound.RateLimits = &tc.rl
			m.RateLimitMapFile = "/x.map"
			err := m.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
		})
	}
}
