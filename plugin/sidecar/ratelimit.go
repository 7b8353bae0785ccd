package sidecar

// Proxy.Config rate_limits: budgets of requests and connections on the
// inbound listener (render/ratelimit.go renders them). The block may come
// from the registration or from the proxy-defaults config entry, which the
// agent merges in. Nomad's HCL writes a nested block as a list of one
// map: both shapes are read. Any key not listed here is refused by name,
// so that a typo does not leave a service unprotected unnoticed.

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

const rateLimitsKey = "rate_limits"

// readRateLimits reads Proxy.Config rate_limits (nil when absent).
func readRateLimits(cfg map[string]any) (*render.RateLimits, error) {
	v, ok := cfg[rateLimitsKey]
	if !ok || v == nil {
		return nil, nil
	}
	rl, err := parseRateLimits(v)
	if err == nil {
		err = rl.Validate()
	}
	if err != nil {
		return nil, fmt.Errorf("Proxy.Config.%w", err)
	}
	return rl, nil
}

func parseRateLimits(v any) (*render.RateLimits, error) {
	top, err := block(rateLimitsKey, v, "requests_per_second", "requests_max_burst", "per_source", "routes", "connections_per_second")
	if err != nil {
		return nil, err
	}
	rl := &render.RateLimits{}
	if _, ok := top["requests_per_second"]; ok {
		b, err := budget(rateLimitsKey, top)
		if err != nil {
			return nil, err
		}
		rl.Instance = &b
	} else if _, ok := top["requests_max_burst"]; ok {
		return nil, fmt.Errorf("%s: requests_max_burst without requests_per_second", rateLimitsKey)
	}
	if n, err := intOption(top, "connections_per_second", 0); err != nil {
		return nil, fmt.Errorf("%s.%w", rateLimitsKey, err)
	} else {
		rl.ConnectionsPerSecond = n
	}
	if ps, ok := top["per_source"]; ok && ps != nil {
		m, err := block(rateLimitsKey+".per_source", ps)
		if err != nil {
			return nil, err
		}
		rl.PerSource = map[string]render.Budget{}
		for _, name := range sortedKeys(m) {
			what := rateLimitsKey + ".per_source." + name
			src, err := block(what, m[name], "requests_per_second", "requests_max_burst")
			if err != nil {
				return nil, err
			}
			if rl.PerSource[name], err = budget(what, src); err != nil {
				return nil, err
			}
		}
	}
	if rs, ok := top["routes"]; ok && rs != nil {
		list, ok := rs.([]any)
		if !ok {
			return nil, fmt.Errorf("%s.routes: %s (%T) is not a list", rateLimitsKey, shortValue(rs), rs)
		}
		for i, r := range list {
			what := fmt.Sprintf("%s.routes[%d]", rateLimitsKey, i)
			m, err := block(what, r, "path_exact", "path_prefix", "path_regex", "requests_per_second", "requests_max_burst")
			if err != nil {
				return nil, err
			}
			var route render.RouteLimit
			for _, p := range []struct {
				key string
				to  *string
			}{{"path_exact", &route.PathExact}, {"path_prefix", &route.PathPrefix}, {"path_regex", &route.PathRegex}} {
				if pv, ok := m[p.key]; ok && pv != nil {
					s, ok := pv.(string)
					if !ok {
						return nil, fmt.Errorf("%s.%s: %s (%T) is not a string", what, p.key, shortValue(pv), pv)
					}
					*p.to = s
				}
			}
			if route.Budget, err = budget(what, m); err != nil {
				return nil, err
			}
			rl.Routes = append(rl.Routes, route)
		}
	}
	return rl, nil
}

// block reads v as an object with only the keys allowed (any key when
// none are given); a list of one object (Nomad's HCL) is that object.
func block(what string, v any, allowed ...string) (map[string]any, error) {
	if l, ok := v.([]any); ok && len(l) == 1 {
		v = l[0]
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("%s: %s (%T) is not an object", what, shortValue(v), v)
	}
	if len(allowed) > 0 {
		for _, k := range sortedKeys(m) {
			known := false
			for _, a := range allowed {
				known = known || k == a
			}
			if !known {
				return nil, fmt.Errorf("%s.%s: unknown key (want %s)", what, k, strings.Join(allowed, ", "))
			}
		}
	}
	return m, nil
}

// budget reads requests_per_second (a number, fractions allowed) and
// requests_max_burst (an integer; absent: the rate, rounded up).
func budget(what string, m map[string]any) (render.Budget, error) {
	var b render.Budget
	switch r := m["requests_per_second"].(type) {
	case float64:
		b.RequestsPerSecond = r
	case int:
		b.RequestsPerSecond = float64(r)
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
		if err != nil {
			return b, fmt.Errorf("%s.requests_per_second: %q is not a number", what, r)
		}
		b.RequestsPerSecond = f
	case nil:
		return b, fmt.Errorf("%s.requests_per_second: missing", what)
	default:
		return b, fmt.Errorf("%s.requests_per_second: %s (%T) is not a number", what, shortValue(r), r)
	}
	if math.IsInf(b.RequestsPerSecond, 0) || math.IsNaN(b.RequestsPerSecond) || b.RequestsPerSecond > 1e9 {
		return b, fmt.Errorf("%s.requests_per_second: %v is out of range", what, b.RequestsPerSecond)
	}
	burst, err := intOption(m, "requests_max_burst", int(math.Ceil(b.RequestsPerSecond)))
	if err != nil {
		return b, fmt.Errorf("%s.%w", what, err)
	}
	b.RequestsMaxBurst = burst
	return b, nil
}

// mapCommands changes the rate limit map HAProxy runs from prev's entries
// to next's (same shape: the same map file is loaded).
func mapCommands(file string, prev, next []render.MapEntry) []haproxy.Command {
	old := map[string]string{}
	for _, e := range prev {
		old[e.Key] = e.Value
	}
	var cmds []haproxy.Command
	seen := map[string]bool{}
	for _, e := range next {
		seen[e.Key] = true
		switch v, ok := old[e.Key]; {
		case !ok:
			cmds = append(cmds, haproxy.AddMap(file, e.Key, e.Value))
		case v != e.Value:
			cmds = append(cmds, haproxy.SetMap(file, e.Key, e.Value))
		}
	}
	var gone []string
	for k := range old {
		if !seen[k] {
			gone = append(gone, k)
		}
	}
	sort.Strings(gone)
	for _, k := range gone {
		cmds = append(cmds, haproxy.DelMap(file, k))
	}
	return cmds
}
