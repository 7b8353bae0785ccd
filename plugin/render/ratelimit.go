package render

// Rate limits on the inbound listener (Inbound.RateLimits), counted in
// stick tables that every thread shares.
//
// HAProxy 2.6 measures a rate over a period and has no token bucket. A
// budget of R requests a second with a burst of B is a sliding window: at
// most B requests admitted in any window of B/R seconds. A caller that was
// quiet may send B at once; one that keeps sending gets R a second on
// average. Only admitted requests are counted, so a caller over its budget
// is not locked out: it gets its share again as the window slides.
//
// Per request, after the authorization (a denied request never counts):
//
//	sc0  the caller's entry, "<source>|<destination>" in haconnect_callers
//	     (no budget of its own) or haconnect_callers_w<ms> (a per-source
//	     budget with that window): the telemetry counters, the requests it
//	     had refused by scope, gpc0_rate (its requests admitted) and
//	     gpc1_rate (its connections admitted).
//	sc1  the scope's entry, "@instance" or "@r<n>" (the first route that
//	     matches the path) in haconnect_limits_w<ms>: gpc1_rate, the
//	     requests admitted in that scope. A route's budget replaces the
//	     instance's for the requests it matches, as in Consul Enterprise.
//	sc2  open streams, for revocation (unchanged).
//
// HAProxy 2.6.12 has three sticky counters a stream; these are all of
// them, which is why telemetry and the per-source budget share one entry.
//
// The budgets' numbers live in a map file (RateLimitMap): "<key> <window
// ms>:<limit>", keys being source service names, "*" (callers not named),
// "@instance", "@r<n>" and "@connections". A change of numbers that keeps
// the set of windows is applied through the runtime API, counters kept; a
// new window is a new table, which needs a reload.

import (
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// RateLimits are Proxy.Config rate_limits (plugin/sidecar/ratelimit.go
// reads them).
type RateLimits struct {
	// Instance is the budget of all callers together (nil: none).
	Instance *Budget
	// PerSource budgets each calling service on its own; "*" is the
	// budget of each caller not named.
	PerSource map[string]Budget
	// Routes replace Instance for the requests whose path they match (the
	// first one that matches).
	Routes []RouteLimit
	// ConnectionsPerSecond is each caller's budget of new connections
	// (0: none), for TCP listeners too.
	ConnectionsPerSecond int
}

// Budget is a rate of requests and the most admitted at once.
type Budget struct {
	RequestsPerSecond float64
	RequestsMaxBurst  int
}

// WindowMS is the budget's window: RequestsMaxBurst requests in any
// window this long make RequestsPerSecond on average.
func (b Budget) WindowMS() int {
	return int(math.Round(float64(b.RequestsMaxBurst) * 1000 / b.RequestsPerSecond))
}

// RouteLimit is a budget for the requests whose normalized path matches.
type RouteLimit struct {
	PathExact, PathPrefix, PathRegex string
	Budget
}

// What returns the route's match as the scope label and messages name it.
func (r RouteLimit) What() string {
	switch {
	case r.PathExact != "":
		return "path_exact " + r.PathExact
	case r.PathPrefix != "":
		return "path_prefix " + r.PathPrefix
	}
	return "path_regex " + r.PathRegex
}

// Limits on what a rate_limits block may hold: each route and scope is a
// counter in every caller's entry.
const (
	maxRateRoutes   = 32
	maxRateSources  = 1000
	maxRateWindowMS = 24 * 3600 * 1000
	maxRatePathLen  = 1024
)

// Keys of the rate limit map beside the source names.
const (
	rateKeyAnySource   = "*"
	rateKeyInstance    = "@instance"
	rateKeyConnections = "@connections"
)

func rateKeyRoute(i int) string { return "@r" + strconv.Itoa(i+1) }

// Stick tables of the rate limits and telemetry.
const (
	callersTable = "haconnect_callers"
	// connectionsWindowMS is connections_per_second's window.
	connectionsWindowMS = 1000
)

func callersWindowTable(ms int) string { return fmt.Sprintf("%s_w%d", callersTable, ms) }
func limitsWindowTable(ms int) string  { return fmt.Sprintf("haconnect_limits_w%d", ms) }

// Scope labels of haconnect_rate_limited_total (and the 429's message).
const (
	ScopeSource      = "source"
	ScopeInstance    = "instance"
	ScopeConnections = "connections"
)

// ScopeRoute is a route's scope label.
func ScopeRoute(r RouteLimit) string { return "route " + r.What() }

// Validate refuses budgets HAProxy could not count as asked, naming the
// field (as in Proxy.Config).
func (rl *RateLimits) Validate() error {
	var errs []string
	validateRateLimits(func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }, rl)
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// validateRateLimits refuses budgets HAProxy could not count as asked.
func validateRateLimits(bad func(string, ...any), rl *RateLimits) {
	if rl == nil {
		return
	}
	budget := func(what string, b Budget) {
		switch {
		case math.IsNaN(b.RequestsPerSecond) || b.RequestsPerSecond <= 0:
			bad("%s: requests_per_second %v must be more than 0", what, b.RequestsPerSecond)
		case float64(b.RequestsMaxBurst) < b.RequestsPerSecond:
			bad("%s: requests_max_burst %d is less than requests_per_second %v", what, b.RequestsMaxBurst, b.RequestsPerSecond)
		case b.WindowMS() < 1 || b.WindowMS() > maxRateWindowMS:
			bad("%s: a window of requests_max_burst/requests_per_second = %d ms is out of range 1 ms-24 h", what, b.WindowMS())
		}
	}
	if rl.Instance != nil {
		budget("rate_limits", *rl.Instance)
	}
	if len(rl.PerSource) > maxRateSources {
		bad("rate_limits.per_source: %d sources, at most %d", len(rl.PerSource), maxRateSources)
	}
	for name, b := range rl.PerSource {
		if name != rateKeyAnySource && !validName(name) {
			bad("rate_limits.per_source: %q is not a service name", name)
		}
		budget("rate_limits.per_source."+name, b)
	}
	if len(rl.Routes) > maxRateRoutes {
		bad("rate_limits.routes: %d routes, at most %d", len(rl.Routes), maxRateRoutes)
	}
	for i, r := range rl.Routes {
		what := fmt.Sprintf("rate_limits.routes[%d]", i)
		n := 0
		for _, p := range []string{r.PathExact, r.PathPrefix, r.PathRegex} {
			if p != "" {
				n++
			}
			if len(p) > maxRatePathLen || strings.IndexFunc(p, func(c rune) bool { return c <= ' ' || c >= 0x7f }) >= 0 {
				bad("%s: path %q must be at most %d printable ASCII characters, without spaces", what, p, maxRatePathLen)
			}
		}
		if n != 1 {
			bad("%s: exactly one of path_exact, path_prefix, path_regex", what)
		}
		if p := r.PathExact + r.PathPrefix; p != "" && !strings.HasPrefix(p, "/") {
			bad("%s: path %q does not start with /", what, p)
		}
		if r.PathRegex != "" {
			if _, err := regexp.Compile(r.PathRegex); err != nil {
				bad("%s: path_regex %q is not an RE2 regular expression: %v", what, r.PathRegex, err)
			}
		}
		budget(what, r.Budget)
	}
	if rl.ConnectionsPerSecond < 0 {
		bad("rate_limits.connections_per_second %d is negative", rl.ConnectionsPerSecond)
	}
}

// MapEntry is one line of the rate limit map.
type MapEntry struct{ Key, Value string }

// RateLimitMap is the content of RateLimitMapFile, sorted by key (empty
// without rate limits).
func (m *Model) RateLimitMap() []MapEntry {
	rl := m.Inbound.RateLimits
	if rl == nil {
		return nil
	}
	val := func(b Budget) string { return fmt.Sprintf("%d:%d", b.WindowMS(), b.RequestsMaxBurst) }
	var out []MapEntry
	if IsHTTP(m.Inbound.Protocol) {
		for name, b := range rl.PerSource {
			out = append(out, MapEntry{name, val(b)})
		}
		if rl.Instance != nil {
			out = append(out, MapEntry{rateKeyInstance, val(*rl.Instance)})
		}
		for i, r := range rl.Routes {
			out = append(out, MapEntry{rateKeyRoute(i), val(r.Budget)})
		}
	}
	if rl.ConnectionsPerSecond > 0 {
		out = append(out, MapEntry{rateKeyConnections, fmt.Sprintf("%d:%d", connectionsWindowMS, rl.ConnectionsPerSecond)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// RateLimitMapText is RateLimitMap as a map file.
func (m *Model) RateLimitMapText() string { return MapText(m.RateLimitMap()) }

// callers is the layout of a caller's entry: the telemetry counters, then
// one counter per scope a request of it can be refused in.
type callers struct {
	// Tables are the caller tables: callersTable (no per-source budget),
	// then one per distinct per-source window.
	Tables []callerTable
	// Scopes are the refusal counters, Index into the gpc array.
	Scopes []rateScope
	// Counters is the gpc array's size.
	Counters int
	// Connections: the entries also count connections (gpc1_rate).
	Connections bool
}

type callerTable struct {
	Name     string
	WindowMS int // 0: callersTable, no per-source budget
}

// rateScope is one way a request is refused: its counter in the caller's
// entry, its key in the map ("" for the per-source budget), the rules
// that pick it.
type rateScope struct {
	Index int
	Label string
	Key   string
	// Cond is a route's path condition (HAProxy ACL text).
	Cond string
}

// Message is the 429's text for the scope, in double quotes for the
// configuration ('\', '"' and '$' escaped), ending in a new line.
func (s rateScope) Message() string {
	return doubleQuote("haconnect: rate limited ("+s.Label+")", `\n`)
}

func doubleQuote(s, suffix string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, `$`, `\$`).Replace(s) + suffix + `"`
}

// GRPCMessage is the grpc-message of the scope's RESOURCE_EXHAUSTED: a
// log-format string ('%' doubled) of a percent-encoded value (gRPC
// encodes '%' itself).
func (s rateScope) GRPCMessage() string {
	v := strings.ReplaceAll("haconnect: rate limited ("+s.Label+")", "%", "%25")
	return doubleQuote(strings.ReplaceAll(v, "%", "%%"), "")
}

// LabelHex is the label for the Lua scraper (hex: any character passes
// through setenv).
func (s rateScope) LabelHex() string { return fmt.Sprintf("%x", s.Label) }

// rateView is what the template reads about the rate limits.
type rateView struct {
	// Requests: some request budget applies (HTTP listeners).
	Requests bool
	// PerSource, Scoped (instance or routes), Routes, Connections: which
	// kinds.
	PerSource, Scoped, Routes, Connections bool
	// SourceWindows and ScopeWindows are the distinct windows, one table
	// each.
	SourceWindows, ScopeWindows []int
	// Source, ConnectionScope are the per-source and connection scopes;
	// ScopeList the instance's and the routes', in matching order (routes
	// first).
	Source, ConnectionScope rateScope
	ScopeList               []rateScope
	Instance                *rateScope
	MapFile                 string
}

// scopedLimits reports whether m has instance or route rate limits, whose
// entries sc1 holds (then telemetry keeps its sum with bit counters).
func scopedLimits(m *Model) bool {
	rl := m.Inbound.RateLimits
	return rl != nil && IsHTTP(m.Inbound.Protocol) && (rl.Instance != nil || len(rl.Routes) > 0)
}

// newRates lays out the caller entries and the rate limits' rules.
func newRates(m *Model, tel telemetry) (callers, rateView) {
	c := callers{Tables: []callerTable{{Name: callersTable}}}
	v := rateView{MapFile: m.RateLimitMapFile}
	next := tel.Counters
	scope := func(label, key, cond string) rateScope {
		s := rateScope{Index: next, Label: label, Key: key, Cond: cond}
		next++
		c.Scopes = append(c.Scopes, s)
		return s
	}
	rl := m.Inbound.RateLimits
	if rl != nil {
		if rl.ConnectionsPerSecond > 0 {
			v.Connections, c.Connections = true, true
			v.ConnectionScope = scope(ScopeConnections, rateKeyConnections, "")
		}
		if IsHTTP(m.Inbound.Protocol) {
			if len(rl.PerSource) > 0 {
				v.PerSource = true
				v.Source = scope(ScopeSource, "", "")
				for _, b := range rl.PerSource {
					v.SourceWindows = appendUnique(v.SourceWindows, b.WindowMS())
				}
				sort.Ints(v.SourceWindows)
				for _, w := range v.SourceWindows {
					c.Tables = append(c.Tables, callerTable{Name: callersWindowTable(w), WindowMS: w})
				}
			}
			v.Routes = len(rl.Routes) > 0
			for i, r := range rl.Routes {
				v.ScopeList = append(v.ScopeList, scope(ScopeRoute(r), rateKeyRoute(i), routeCond(r)))
				v.ScopeWindows = appendUnique(v.ScopeWindows, r.WindowMS())
			}
			if rl.Instance != nil {
				s := scope(ScopeInstance, rateKeyInstance, "")
				v.Instance = &s
				v.ScopeList = append(v.ScopeList, s)
				v.ScopeWindows = appendUnique(v.ScopeWindows, rl.Instance.WindowMS())
			}
			sort.Ints(v.ScopeWindows)
			v.Scoped = len(v.ScopeList) > 0
			v.Requests = v.PerSource || v.Scoped
		}
	}
	c.Counters = next
	return c, v
}

// routeCond is a route's condition on the normalized path.
func routeCond(r RouteLimit) string {
	switch {
	case r.PathExact != "":
		return "{ path -m str -- " + quote(r.PathExact) + " }"
	case r.PathPrefix != "":
		return "{ path -m beg -- " + quote(r.PathPrefix) + " }"
	}
	return "{ path -m reg -- " + quote(fullRegex(r.PathRegex)) + " }"
}

func appendUnique(s []int, v int) []int {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

// CallerTableName and LimitsTableName name the tables of a window (for
// templates).
func (rateView) CallerTableName(ms int) string { return callersWindowTable(ms) }

// LimitsTableName: see CallerTableName.
func (rateView) LimitsTableName(ms int) string { return limitsWindowTable(ms) }

// AnySourceKey and ConnectionsKey are map keys (for templates).
func (rateView) AnySourceKey() string   { return rateKeyAnySource }
func (rateView) ConnectionsKey() string { return rateKeyConnections }

// TableNames are the caller tables, comma-separated (for the scraper).
func (c callers) TableNames() string {
	var names []string
	for _, t := range c.Tables {
		names = append(names, t.Name)
	}
	return strings.Join(names, ",")
}

// ScopesHex are the scope labels, hex, comma-separated, in counter order
// from the first scope's index (for the scraper); "-" for none (setenv
// needs a value).
func (c callers) ScopesHex() string {
	if len(c.Scopes) == 0 {
		return "-"
	}
	var out []string
	for _, s := range c.Scopes {
		out = append(out, s.LabelHex())
	}
	return strings.Join(out, ",")
}

// ScopeBase is the first scope counter's index.
func (c callers) ScopeBase() int {
	if len(c.Scopes) == 0 {
		return c.Counters
	}
	return c.Scopes[0].Index
}
