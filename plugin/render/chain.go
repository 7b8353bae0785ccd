package render

// The rendering of an upstream routed by its discovery chain (Upstream.
// Routes and Targets): the rule lines of the upstream's frontend, which
// pick a route, a split and a target for each request (HTTP) or
// connection (TCP), and the views of the targets' backends, which the
// template renders with the same "backend" definition as an upstream
// without a chain.
//
// Per request, in the frontend:
//
//	txn.hc_route  the first route whose match holds (the last matches all)
//	txn.hc_rand   one rand(10000) draw, when some route has several splits
//	txn.hc_split  the split chosen, numbered across all routes
//	txn.hc_be     the first target of the split whose backend has a usable
//	              server (nbsrv > 0), else its first target (503)
//
// then `use_backend %[var(txn.hc_be)]`. Settings HAProxy only has per
// backend (server timeout, retries) are set in each target backend,
// conditioned on txn.hc_route.
//
// Every value taken from Consul is written as one quoted word (quote) and
// was checked by validateChain: no control character, regular
// expressions that compile as RE2, names made of token characters.

import (
	"fmt"
	"hash/fnv"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/haconnect/haconnect/plugin/chain"
)

// Variables of the routing rules.
const (
	varRoute = "txn.hc_route"
	varSplit = "txn.hc_split"
	varRand  = "txn.hc_rand"
	varBE    = "txn.hc_be"
)

// maxRouteTerms bounds the ACLs of one route's rule: HAProxy 2.6 reads at
// most 64 words a line (MAX_LINE_ARGS), and the rule has 9 of its own.
const maxRouteTerms = 50

// defaultRetries is the upstream backend's retries when no route sets
// NumRetries (an upstream without a chain has the same).
const defaultRetries = 3

// retryStatuses are the answers HAProxy 2.6's retry-on can retry on.
var retryStatuses = []int{401, 403, 404, 408, 425, 500, 501, 502, 503, 504}

// quote makes s one word of HAProxy's configuration, read back exactly:
// single quotes keep everything literal (backslashes, '#', '$', spaces);
// a value holding a single quote goes in double quotes, where '\', '"'
// and '$' (environment expansion) are escaped. Control characters are
// refused by validateChain before.
func quote(s string) string {
	if !strings.Contains(s, "'") {
		return "'" + s + "'"
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, `$`, `\$`).Replace(s) + `"`
}

// fullRegex anchors an RE2 pattern: Envoy's safe_regex matches the whole
// value, HAProxy's -m reg searches in it.
func fullRegex(re string) string { return "^(?:" + re + ")$" }

func routeIs(i int) string { return fmt.Sprintf("{ var(%s) -m int %d }", varRoute, i) }
func splitIs(s int) string { return fmt.Sprintf("{ var(%s) -m int %d }", varSplit, s) }

// ChainFrontend is the upstream frontend's routing rules, for an upstream
// with Routes (template: one line each).
func ChainFrontend(u Upstream) []string {
	if !IsHTTP(u.Protocol) {
		return tcpChainFrontend(u)
	}
	var acls, sel, mods, resp []string
	add := func(to *[]string, format string, args ...any) { *to = append(*to, fmt.Sprintf(format, args...)) }
	rand := false
	for _, r := range u.Routes {
		rand = rand || len(r.Splits) > 1
	}
	if rand {
		add(&sel, "# One draw per request chooses among a route's splits (weights out of %d).", chain.TotalWeight)
		add(&sel, "http-request set-var(%s) rand(%d)", varRand, chain.TotalWeight)
	}
	add(&sel, "# The first route whose match holds (Consul's order); the last one matches every request.")
	s := 0 // splits are numbered across routes
	var splitLines, failLines []string
	for i, r := range u.Routes {
		conds := routeACLs(&acls, i, r.Match)
		guard := ""
		if i > 0 {
			guard = fmt.Sprintf("!{ var(%s) -m found } ", varRoute)
		}
		if len(conds) == 0 {
			if guard == "" {
				add(&sel, "http-request set-var(%s) int(%d)", varRoute, i)
			} else {
				add(&sel, "http-request set-var(%s) int(%d) unless { var(%s) -m found }", varRoute, i, varRoute)
			}
		} else {
			add(&sel, "http-request set-var(%s) int(%d) if %s%s", varRoute, i, guard, strings.Join(conds, " "))
		}
		// Splits: cumulative weights against the one draw; the last split
		// with a weight takes the rest.
		last := lastWeighted(r.Splits)
		cum := 0
		for k, sp := range r.Splits {
			id := s + k
			cum += sp.Weight
			switch {
			case sp.Weight == 0:
				add(&splitLines, "# split %d of route %d has weight 0: never chosen", id, i)
			case len(r.Splits) == 1 || k == last:
				add(&splitLines, "http-request set-var(%s) int(%d) if %s !{ var(%s) -m found }", varSplit, id, routeIs(i), varSplit)
			default:
				// The cumulative weight is a process variable (set in
				// global, see SplitVars) so that a weight change goes
				// through the runtime API, not a reload.
				add(&splitLines, "http-request set-var(%s) int(%d) if %s !{ var(%s) -m found } { var(%s),sub(%s) lt 0 }",
					varSplit, id, routeIs(i), varSplit, varRand, splitVarName(u, id))
			}
			failLines = append(failLines, failover(u, "http-request", splitIs(id), sp.Targets)...)
			// A split's modifiers first, its route's after: Envoy applies
			// the less specific (route) level last, so it wins a clash.
			headerRules(&mods, "http-request", splitIs(id), sp.RequestHeaders)
			headerRules(&resp, "http-response", splitIs(id), sp.ResponseHeaders)
		}
		s += len(r.Splits)
		if r.PrefixRewrite != "" {
			add(&mods, "http-request replace-path %s %s if %s", quote("^"+regexp.QuoteMeta(r.RewriteFrom)+"(.*)"),
				quote(r.PrefixRewrite+`\1`), routeIs(i))
		}
		headerRules(&mods, "http-request", routeIs(i), r.RequestHeaders)
		headerRules(&resp, "http-response", routeIs(i), r.ResponseHeaders)
	}
	out := []string{"# Discovery chain: Consul's routes, splits and failover targets."}
	out = append(out, acls...)
	out = append(out, sel...)
	out = append(out, splitLines...)
	out = append(out, "# Failover: a split's first target with a usable server, else its first (503).")
	out = append(out, failLines...)
	// The upstream's name is a validName: safe in double quotes.
	out = append(out, pendingRules(u, `http-request return status 503 content-type text/plain string "haconnect: upstream `+
		u.Name+` overloaded (max_pending_requests)\n"`)...)
	if len(mods) > 0 {
		out = append(out, "# The route's prefix rewrite and request header modifiers (a split's, then its route's).")
		out = append(out, mods...)
	}
	if len(resp) > 0 {
		out = append(out, "# Response header modifiers, by the request's route and split.")
		out = append(out, resp...)
	}
	return append(out, fmt.Sprintf("use_backend %%[var(%s)]", varBE))
}

// tcpChainFrontend: a TCP chain is its resolver alone, one route with
// one split (validateChain): failover between its targets.
func tcpChainFrontend(u Upstream) []string {
	out := []string{"# Discovery chain (TCP: the resolver alone): the first target with a usable server, else the first."}
	out = append(out, failover(u, "tcp-request content", "", u.Routes[0].Splits[0].Targets)...)
	out = append(out, pendingRules(u, "tcp-request content reject")...)
	return append(out, fmt.Sprintf("use_backend %%[var(%s)]", varBE))
}

// failover sets varBE to the first of targets whose backend has a usable
// server (up, not in maintenance: empty slots are disabled), else to the
// first target, whose backend then answers 503.
func failover(u Upstream, rule, cond string, targets []string) []string {
	if cond != "" {
		cond += " "
	}
	if len(targets) == 1 {
		return []string{strings.TrimSpace(fmt.Sprintf("%s set-var(%s) str(%s) %s", rule, varBE, u.TargetBackend(targets[0]), ifCond(cond)))}
	}
	var out []string
	for j, id := range targets {
		be := u.TargetBackend(id)
		guard := ""
		if j > 0 {
			guard = fmt.Sprintf("!{ var(%s) -m found } ", varBE)
		}
		out = append(out, fmt.Sprintf("%s set-var(%s) str(%s) if %s%s{ nbsrv(%s) gt 0 }", rule, varBE, be, cond, guard, be))
	}
	first := u.TargetBackend(targets[0])
	if cond == "" {
		return append(out, fmt.Sprintf("%s set-var(%s) str(%s) unless { var(%s) -m found }", rule, varBE, first, varBE))
	}
	return append(out, fmt.Sprintf("%s set-var(%s) str(%s) if %s!{ var(%s) -m found }", rule, varBE, first, cond, varBE))
}

func ifCond(cond string) string {
	if cond == "" {
		return ""
	}
	return "if " + cond
}

// pendingRules: Envoy's max_pending_requests, per target backend (each
// has its own queue): one more request than may wait is refused at once.
func pendingRules(u Upstream, action string) []string {
	l := u.Limits
	if l == nil || !l.LimitPending {
		return nil
	}
	out := []string{fmt.Sprintf("# max_pending_requests: at most %d waiting in the chosen target's queue.", l.MaxPending)}
	for _, t := range u.Targets {
		be := u.TargetBackend(t.ID)
		out = append(out, fmt.Sprintf("%s if { var(%s) -m str %s } { queue(%s) ge %d }", action, varBE, be, be, l.MaxPending))
	}
	return out
}

// routeACLs declares route i's match as named ACLs (one per condition;
// ACLs of one name are ORed, so each condition has its own) and returns
// the terms that must all hold. Patterns follow "--", so a value starting
// with '-' is not read as a flag.
func routeACLs(acls *[]string, i int, m *chain.Match) []string {
	if m == nil {
		return nil
	}
	var terms []string
	acl := func(name, def string, neg bool) {
		name = fmt.Sprintf("hc_r%d_%s", i, name)
		*acls = append(*acls, "acl "+name+" "+def)
		if neg {
			name = "!" + name
		}
		terms = append(terms, name)
	}
	switch {
	case m.PathExact != "":
		acl("path", "path -m str -- "+quote(m.PathExact), false)
	case m.PathPrefix != "" && m.PathPrefix != "/":
		acl("path", "path -m beg -- "+quote(m.PathPrefix), false)
	case m.PathRegex != "":
		acl("path", "path -m reg -- "+quote(fullRegex(m.PathRegex)), false)
	}
	for j, h := range m.Headers {
		// req.fhdr: the whole value, commas included (req.hdr would
		// split it at commas).
		f := "req.fhdr(" + h.Name + ")"
		var def string
		switch {
		case h.Present:
			def = f + " -m found"
		case h.Exact != "":
			def = f + " -m str -- " + quote(h.Exact)
		case h.Prefix != "":
			def = f + " -m beg -- " + quote(h.Prefix)
		case h.Suffix != "":
			def = f + " -m end -- " + quote(h.Suffix)
		default:
			def = f + " -m reg -- " + quote(fullRegex(h.Regex))
		}
		if h.Invert && !h.Present {
			// Envoy: an absent header matches only an inverted Present
			// test; an inverted value test needs the header there.
			acl("h"+strconv.Itoa(j)+"f", f+" -m found", false)
		}
		acl("h"+strconv.Itoa(j), def, h.Invert)
	}
	for j, q := range m.Query {
		f := "url_param(" + q.Name + ")"
		var def string
		switch {
		case q.Present:
			// Envoy counts "?p" as present; url_param finds only "p=".
			def = "query -m reg -- " + quote("(^|&)"+regexp.QuoteMeta(q.Name)+"(=|&|$)")
		case q.Exact != "":
			def = f + " -m str -- " + quote(q.Exact)
		default:
			def = f + " -m reg -- " + quote(fullRegex(q.Regex))
		}
		acl("q"+strconv.Itoa(j), def, false)
	}
	if len(m.Methods) > 0 {
		acl("m", "method "+strings.Join(m.Methods, " "), false)
	}
	return terms
}

// headerRules renders header modifiers under cond, in Envoy's order for
// what Consul gives it: removals first (Envoy's remove-before-add), then
// Add (appends), then Set (replaces: a header in both ends with Set's
// value, as Consul lists Add before Set). Values are HAProxy log-format
// strings: Envoy reads "%%" as a literal '%' and "%NAME%" as one of its
// variables; validateChain refuses the variables, and "%%" means the same
// to HAProxy.
func headerRules(out *[]string, rule, cond string, h chain.HeaderModifiers) {
	for _, name := range h.Remove {
		*out = append(*out, fmt.Sprintf("%s del-header %s if %s", rule, name, cond))
	}
	for _, kv := range []struct {
		action string
		m      map[string]string
	}{{"add-header", h.Add}, {"set-header", h.Set}} {
		names := make([]string, 0, len(kv.m))
		for n := range kv.m {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			*out = append(*out, fmt.Sprintf("%s %s %s %s if %s", rule, kv.action, n, quote(kv.m[n]), cond))
		}
	}
}

// hasEnvoyVariable reports whether v uses a '%' other than "%%".
func hasEnvoyVariable(v string) bool {
	return strings.Contains(strings.ReplaceAll(v, "%%", ""), "%")
}

// backendView is what the template's "backend" definition renders: an
// upstream's one backend, or one of its chain's target backends.
type backendView struct {
	V *view
	U Upstream
	// Name is the section's name.
	Name             string
	PeerURI, SNI     string
	ConnectTimeoutMS int
	Servers          []Server
	// Balance are the balance lines.
	Balance []string
	Retries int
	// RetryOn, when set, replaces the default retry-on line, with
	// RetryNotes as comments above it.
	RetryOn    string
	RetryNotes []string
	// Rules are http-request lines after the default ones.
	Rules []string
	// FailFast: the target has a failover target after it. A failed
	// connection to one of its instances takes that instance out at once
	// (observe layer4, error-limit 1), so that the next requests go to the
	// failover target instead of waiting for two failed health checks (an
	// instance killed before Consul noticed failed 1.2-2 s of requests).
	FailFast bool
}

// UpstreamBackend is the view of an upstream's backend without a chain.
func (v *view) UpstreamBackend(u Upstream) backendView {
	return backendView{V: v, U: u, Name: u.Backend(), PeerURI: u.PeerURI, SNI: u.SNI,
		ConnectTimeoutMS: msOr(u.ConnectTimeoutMS, 5000), Servers: u.Servers,
		Balance: []string{"balance roundrobin"}, Retries: defaultRetries}
}

// TargetBackends are the views of an upstream's chain targets' backends,
// in the order of Targets.
func (v *view) TargetBackends(u Upstream) []backendView {
	out := make([]backendView, 0, len(u.Targets))
	for _, t := range u.Targets {
		b := backendView{V: v, U: u, Name: u.TargetBackend(t.ID), PeerURI: t.PeerURI, SNI: t.SNI,
			ConnectTimeoutMS: msOr(t.ConnectTimeoutMS, msOr(u.ConnectTimeoutMS, 5000)), Servers: t.Servers,
			Balance: balanceLines(t.Balance), Retries: defaultRetries}
		if IsHTTP(u.Protocol) {
			b.Rules = append(b.Rules, hashKeyRules(t.Balance)...)
			targetRouteRules(&b, u, t.ID)
		}
		b.FailFast = hasFailover(u, t.ID)
		out = append(out, b)
	}
	return out
}

// balanceLines maps a resolver's load balancer onto balance (see
// chain.Balance). Several hash keys are joined, '|' between them, in a
// variable set by hashKeyRules.
func balanceLines(b chain.Balance) []string {
	switch b.Algorithm {
	case "", "roundrobin":
		return []string{"balance roundrobin"}
	case "leastconn", "random":
		return []string{"balance " + b.Algorithm}
	}
	var expr string
	if len(b.Keys) == 1 {
		expr = hashFetch(b.Keys[0])
	} else {
		expr = "var(txn.hc_hkey)"
	}
	return []string{
		"# Consistent hashing (ring_hash, maglev): a request without any of the keys",
		"# goes round robin, as Envoy picks at random when it has no hash.",
		"balance hash " + expr,
		"hash-type consistent",
	}
}

func hashFetch(k chain.HashKey) string {
	switch k.Kind {
	case "header":
		return "req.fhdr(" + k.Name + ")"
	case "cookie":
		return "req.cook(" + k.Name + ")"
	case "query_parameter":
		return "url_param(" + k.Name + ")"
	}
	return "src" // source_ip
}

// hashKeyRules joins several hash keys into txn.hc_hkey, only when at
// least one is present (a request with none has no hash, as in Envoy).
func hashKeyRules(b chain.Balance) []string {
	if b.Algorithm != "hash" || len(b.Keys) < 2 {
		return nil
	}
	var out, found []string
	expr := "str(|)"
	for i, k := range b.Keys {
		v := fmt.Sprintf("txn.hc_hk%d", i)
		out = append(out, fmt.Sprintf("http-request set-var(%s) %s", v, hashFetch(k)))
		expr += fmt.Sprintf(",concat(,%s,|)", v)
		found = append(found, fmt.Sprintf("{ var(%s) -m found }", v))
	}
	return append(out, fmt.Sprintf("http-request set-var(txn.hc_hkey) %s if %s", expr, strings.Join(found, " || ")))
}

// targetRouteRules sets what HAProxy has only per backend from the routes
// that reach target id: retries, retry-on, the server timeout.
func targetRouteRules(b *backendView, u Upstream, id string) {
	defaults := []string{"conn-failure", "empty-response", "response-timeout"}
	defCodes := []int{503}
	if u.PassiveHealth != nil {
		defCodes = []int{500, 502, 503, 504}
	}
	conds := map[string]bool{}
	codes := map[int]bool{}
	retries := 0
	var noL7, timeouts []string
	for i, r := range u.Routes {
		reaches := false
		for _, sp := range r.Splits {
			reaches = reaches || slices.Contains(sp.Targets, id)
		}
		if !reaches {
			continue
		}
		rt := r.Retry
		retries = max(retries, rt.NumRetries)
		if rt.NumRetries == 0 {
			retries = max(retries, defaultRetries)
		}
		if !rt.ConnectFailure && !rt.EmptyResponse && len(rt.StatusCodes) == 0 {
			for _, c := range defaults {
				conds[c] = true
			}
			for _, c := range defCodes {
				codes[c] = true
			}
		} else {
			conds["conn-failure"] = conds["conn-failure"] || rt.ConnectFailure
			conds["empty-response"] = conds["empty-response"] || rt.EmptyResponse
			for _, c := range rt.StatusCodes {
				codes[c] = true
			}
			if !rt.EmptyResponse && len(rt.StatusCodes) == 0 {
				noL7 = append(noL7, fmt.Sprintf("http-request disable-l7-retry if %s", routeIs(i)))
			}
		}
		// Envoy's route timeout bounds the whole request, retries
		// included; HAProxy's timeout server bounds each attempt. So a
		// route with a request timeout is not retried once its request
		// was sent (a retry would run past the timeout); a failed
		// connection, which fails fast, still is.
		if r.RequestTimeoutMS > 0 {
			line := fmt.Sprintf("http-request disable-l7-retry if %s", routeIs(i))
			if len(noL7) == 0 || noL7[len(noL7)-1] != line {
				noL7 = append(noL7, line)
			}
		}
		if ms := minPositive(r.RequestTimeoutMS, r.IdleTimeoutMS); ms > 0 {
			timeouts = append(timeouts, fmt.Sprintf("http-request set-timeout server %d if %s", ms, routeIs(i)))
		}
		if r.IdleTimeoutMS > 0 {
			timeouts = append(timeouts, fmt.Sprintf("http-request set-timeout tunnel %d if %s", r.IdleTimeoutMS, routeIs(i)))
		}
	}
	if retries == 0 {
		retries = defaultRetries
	}
	b.Retries = retries
	var on []string
	for _, c := range defaults {
		if conds[c] {
			on = append(on, c)
		}
	}
	for _, c := range retryStatuses {
		if codes[c] {
			on = append(on, strconv.Itoa(c))
		}
	}
	if len(on) == 0 {
		// Only reached when every route has ConnectFailure alone, which
		// sets conn-failure: kept for safety.
		on = []string{"conn-failure"}
	}
	b.RetryOn = strings.Join(on, " ")
	b.RetryNotes = []string{
		"Retries as the routes reaching this target say, merged: HAProxy has one",
		"retries and one retry-on per backend. retries is the largest NumRetries",
		fmt.Sprintf("(%d for a route without one), retry-on the union of the routes' conditions", defaultRetries),
		"(a route without any keeps haconnect's defaults); a route whose policy",
		"retries only failed connections has its other retries turned off.",
	}
	b.Rules = append(b.Rules, noL7...)
	if len(timeouts) > 0 {
		b.Rules = append(b.Rules,
			"# A route's RequestTimeout and IdleTimeout bound the server's silence (HAProxy's",
			"# timeout server is an inactivity timeout; Envoy's route timeout bounds the",
			"# whole answer); IdleTimeout also bounds an upgraded stream (timeout tunnel).")
		b.Rules = append(b.Rules, timeouts...)
	}
}

func minPositive(a, b int) int {
	switch {
	case a <= 0:
		return max(b, 0)
	case b <= 0:
		return a
	}
	return min(a, b)
}

// validateChain checks an upstream's Routes and Targets (see
// ChainFrontend for what is written where).
func validateChain(bad func(string, ...any), what string, u Upstream, sections map[string]bool) {
	if len(u.Routes) == 0 {
		if len(u.Targets) > 0 {
			bad("%s has chain targets without routes", what)
		}
		return
	}
	if len(u.Targets) == 0 {
		bad("%s has routes without chain targets", what)
		return
	}
	tcp := !IsHTTP(u.Protocol)
	targets := map[string]bool{}
	for _, t := range u.Targets {
		tw := fmt.Sprintf("%s target %q", what, t.ID)
		if !validTargetID(t.ID) {
			bad("%s: not a target ID haconnect can name a backend after", tw)
			continue
		}
		if targets[t.ID] {
			bad("%s is listed twice", tw)
		}
		targets[t.ID] = true
		if be := u.TargetBackend(t.ID); sections[be] {
			bad("%s: backend %s is also another section's name", tw, be)
		} else {
			sections[be] = true
		}
		if !strings.HasPrefix(t.PeerURI, "spiffe://") || !spiffeChars(t.PeerURI) {
			bad("%s peer URI %q", tw, t.PeerURI)
		}
		if t.SNI != "" && !validSNI(t.SNI) {
			bad("%s SNI %q", tw, t.SNI)
		}
		if t.ConnectTimeoutMS < 0 {
			bad("%s connect timeout %d is negative", tw, t.ConnectTimeoutMS)
		}
		checkServers(bad, tw, t.Servers)
		b := t.Balance
		switch b.Algorithm {
		case "", "roundrobin", "leastconn", "random":
		case "hash":
			if len(b.Keys) == 0 {
				bad("%s: hash balance without keys", tw)
			}
			if len(b.Keys) > 10 {
				// hashKeyRules' last rule has 5 words a key (64 a line).
				bad("%s: %d hash keys (at most 10)", tw, len(b.Keys))
			}
			for _, k := range b.Keys {
				switch k.Kind {
				case "source_ip":
				case "header", "cookie", "query_parameter":
					if tcp {
						bad("%s: hash on %s %q in a TCP upstream (mode tcp reads no request: only source_ip)", tw, k.Kind, k.Name)
					}
					if !token(k.Name) {
						bad("%s: hash %s name %q", tw, k.Kind, k.Name)
					}
				default:
					bad("%s: hash key kind %q", tw, k.Kind)
				}
			}
		default:
			bad("%s balance %q (want roundrobin, leastconn, random or hash)", tw, b.Algorithm)
		}
	}
	if tcp && (len(u.Routes) != 1 || len(u.Routes[0].Splits) != 1) {
		bad("%s: a TCP chain has one route with one split (only the resolver applies), not %d routes", what, len(u.Routes))
	}
	for i, r := range u.Routes {
		rw := fmt.Sprintf("%s route %d", what, i)
		if i == len(u.Routes)-1 && r.Match != nil {
			bad("%s: the last route must match every request", rw)
		}
		if tcp && (r.Match != nil || r.PrefixRewrite != "" || r.RequestTimeoutMS != 0 || r.IdleTimeoutMS != 0 ||
			!noRetry(r.Retry) || !r.RequestHeaders.Empty() || !r.ResponseHeaders.Empty()) {
			bad("%s: a TCP route has no match, rewrite, timeout, retry or header modifier (HTTP settings)", rw)
		}
		if r.Match != nil {
			validateMatch(bad, rw, r.Match)
		}
		if r.PrefixRewrite != "" {
			if r.RewriteFrom == "" || !strings.HasPrefix(r.RewriteFrom, "/") {
				bad("%s: prefix rewrite %q without the path prefix it replaces", rw, r.PrefixRewrite)
			}
			if !safeValue(r.PrefixRewrite) || !safeValue(r.RewriteFrom) || strings.ContainsAny(r.PrefixRewrite, `\%`) {
				bad("%s: prefix rewrite %q (no control character, '\\' or '%%')", rw, r.PrefixRewrite)
			}
		}
		if r.RequestTimeoutMS < 0 || r.IdleTimeoutMS < 0 {
			bad("%s: negative timeout", rw)
		}
		if r.Retry.NumRetries < 0 {
			bad("%s: negative NumRetries", rw)
		}
		for _, c := range r.Retry.StatusCodes {
			if !slices.Contains(retryStatuses, c) {
				bad("%s: retry on status %d (HAProxy 2.6 retries only on %v)", rw, c, retryStatuses)
			}
		}
		validateModifiers(bad, rw+" request headers", r.RequestHeaders)
		validateModifiers(bad, rw+" response headers", r.ResponseHeaders)
		if len(r.Splits) == 0 {
			bad("%s has no split", rw)
		}
		total := 0
		for k, sp := range r.Splits {
			sw := fmt.Sprintf("%s split %d", rw, k)
			if sp.Weight < 0 || sp.Weight > chain.TotalWeight {
				bad("%s weight %d (0-%d)", sw, sp.Weight, chain.TotalWeight)
			}
			total += sp.Weight
			if len(sp.Targets) == 0 {
				bad("%s has no target", sw)
			}
			seen := map[string]bool{}
			for _, id := range sp.Targets {
				if !targets[id] {
					bad("%s: target %q is not among the upstream's targets", sw, id)
				}
				if seen[id] {
					bad("%s: target %q twice", sw, id)
				}
				seen[id] = true
			}
			validateModifiers(bad, sw+" request headers", sp.RequestHeaders)
			validateModifiers(bad, sw+" response headers", sp.ResponseHeaders)
		}
		if total != chain.TotalWeight {
			bad("%s: split weights add up to %d, not %d", rw, total, chain.TotalWeight)
		}
	}
}

func noRetry(r chain.Retry) bool {
	return r.NumRetries == 0 && !r.ConnectFailure && !r.EmptyResponse && len(r.StatusCodes) == 0
}

func validateMatch(bad func(string, ...any), rw string, m *chain.Match) {
	paths := 0
	for _, p := range []string{m.PathExact, m.PathPrefix, m.PathRegex} {
		if p != "" {
			paths++
			if !safeValue(p) {
				bad("%s: path %q has a control character", rw, p)
			}
		}
	}
	if paths > 1 {
		bad("%s: more than one of PathExact, PathPrefix, PathRegex", rw)
	}
	// The route's rule names one ACL per condition (two for an inverted
	// header value), and HAProxy reads at most 64 words a line.
	if n := paths + 2*len(m.Headers) + len(m.Query) + 1; n > maxRouteTerms {
		bad("%s: %d header and query conditions, more than one HAProxy rule can hold", rw, len(m.Headers)+len(m.Query))
	}
	checkRegex(bad, rw+" path regex", m.PathRegex)
	for _, h := range m.Headers {
		hw := fmt.Sprintf("%s header %q", rw, h.Name)
		if !token(h.Name) {
			bad("%s: not a header name", hw)
		}
		checkOneCondition(bad, hw, "Present, Exact, Prefix, Suffix, Regex", h.Present, h.Exact, h.Prefix, h.Suffix, h.Regex)
		checkRegex(bad, hw+" regex", h.Regex)
	}
	for _, q := range m.Query {
		qw := fmt.Sprintf("%s query parameter %q", rw, q.Name)
		if !token(q.Name) {
			bad("%s: not a parameter name", qw)
		}
		checkOneCondition(bad, qw, "Present, Exact, Regex", q.Present, q.Exact, q.Regex)
		checkRegex(bad, qw+" regex", q.Regex)
	}
	if len(m.Methods) > 40 {
		bad("%s: %d methods (at most 40 in one rule)", rw, len(m.Methods))
	}
	for _, meth := range m.Methods {
		if !token(meth) {
			bad("%s: method %q", rw, meth)
		}
	}
}

// checkOneCondition refuses a header or query match that sets other than
// exactly one of its kinds (present, or one of values, named by kinds),
// or a value with a control character.
func checkOneCondition(bad func(string, ...any), what, kinds string, present bool, values ...string) {
	n := 0
	if present {
		n++
	}
	for _, v := range values {
		if v != "" {
			n++
			if !safeValue(v) {
				bad("%s: value %q has a control character", what, v)
			}
		}
	}
	if n != 1 {
		bad("%s: exactly one of %s", what, kinds)
	}
}

func checkRegex(bad func(string, ...any), what, re string) {
	if re == "" {
		return
	}
	if _, err := regexp.Compile(re); err != nil {
		bad("%s %q is not an RE2 regular expression: %v", what, re, err)
	}
}

func validateModifiers(bad func(string, ...any), what string, h chain.HeaderModifiers) {
	check := func(name, v string) {
		if !token(name) {
			bad("%s: header name %q", what, name)
		}
		if !safeValue(v) {
			bad("%s: value of %s has a control character", what, name)
		}
		if hasEnvoyVariable(v) {
			bad("%s: value of %s %q uses an Envoy variable (%%NAME%%), which haconnect does not interpret", what, name, v)
		}
	}
	for n, v := range h.Set {
		check(n, v)
	}
	for n, v := range h.Add {
		check(n, v)
	}
	for _, n := range h.Remove {
		check(n, "")
	}
}

// safeValue reports whether v has no control character: any other byte
// is written inside quotes (quote).
func safeValue(v string) bool {
	for _, r := range v {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// token reports whether s is a name (header, method, query parameter,
// cookie) made of letters, digits and "-_.": written unquoted, inside a
// fetch's parentheses.
func token(s string) bool {
	if s == "" || s[0] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.", r)) {
			return false
		}
	}
	return true
}

// validTargetID: a Consul target ID ("<subset>.<service>.<namespace>.
// <partition>.<datacenter>") is part of a backend's name, in which
// HAProxy accepts letters, digits and "-_.:" (not '~').
func validTargetID(id string) bool {
	if id == "" || len(id) > 512 || strings.Contains(id, "::") {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

func checkServers(bad func(string, ...any), what string, servers []Server) {
	for _, s := range servers {
		if s.Addr == "" {
			continue
		}
		checkAddr(bad, what+" instance address", s.Addr)
		checkPort(bad, what+" instance port", s.Port)
		if s.MaxConn < 0 {
			bad("%s slot %s maxconn %d", what, s.Name, s.MaxConn)
		}
	}
}

// SplitVar is the cumulative weight bounding one split of a routed
// upstream: a process variable, set in the global section and changed
// through the runtime API (`set var`) when only weights change. While a
// change goes through, variable by variable, a request may see some old
// and some new bounds: it still gets one of its route's splits.
type SplitVar struct {
	Name  string // proc.hc_w<hash of the upstream's backend>_<split>
	Value int    // out of chain.TotalWeight
}

// splitVarName names split id's bound for u. Variable names allow only
// letters, digits, '.' and '_', so the upstream is named by a hash of its
// backend's name; Validate refuses a collision.
func splitVarName(u Upstream, id int) string {
	h := fnv.New32a()
	h.Write([]byte(u.Backend()))
	return fmt.Sprintf("proc.hc_w%08x_%d", h.Sum32(), id)
}

// SplitVars are the bounds of every split that needs one (HTTP routes
// with several splits; not the last one with a weight).
func (m *Model) SplitVars() []SplitVar {
	var out []SplitVar
	for _, u := range m.Upstreams {
		if !IsHTTP(u.Protocol) {
			continue
		}
		s := 0
		for _, r := range u.Routes {
			last := lastWeighted(r.Splits)
			cum := 0
			for k, sp := range r.Splits {
				cum += sp.Weight
				if len(r.Splits) > 1 && sp.Weight > 0 && k != last {
					out = append(out, SplitVar{Name: splitVarName(u, s+k), Value: cum})
				}
			}
			s += len(r.Splits)
		}
	}
	return out
}

// hasFailover reports whether some split of u fails over from target id
// to another one.
func hasFailover(u Upstream, id string) bool {
	for _, r := range u.Routes {
		for _, sp := range r.Splits {
			for i, t := range sp.Targets {
				if t == id && i < len(sp.Targets)-1 {
					return true
				}
			}
		}
	}
	return false
}

// lastWeighted is the index of the last split with a weight (-1: none),
// the one that takes the rest of the draw.
func lastWeighted(splits []Split) int {
	last := -1
	for k, sp := range splits {
		if sp.Weight > 0 {
			last = k
		}
	}
	return last
}
