// Package chain reads the discovery chain Consul compiled for an upstream
// (service-router, service-splitter, service-resolver) into what the
// upstream's listener must do with each request: routes in order, each
// with weighted splits, each split a list of targets tried in failover
// order. It uses Consul's compiled answer as is and re-implements none of
// its compiler; it is pure (rendering into HAProxy and the watches live
// elsewhere).
//
// What cannot be honoured is refused as a whole (Compile's error names
// every such setting), so that the previous configuration is kept; what
// is served in HAProxy's closest terms is listed in Plan.Approximations,
// to be logged.
package chain

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
)

// TotalWeight is what a route's split weights add up to: Consul's
// percentages with their two decimals.
const TotalWeight = 10000

// Plan is a compiled chain in the terms a proxy serves it.
type Plan struct {
	Service  string // the chain's service (the upstream's name)
	Protocol string // tcp, http, http2 or grpc
	// Routes in order; the last one matches every request. A TCP chain
	// has one route, with no match and one split.
	Routes []Route
	// Targets by ID (Consul's, e.g. "v1.api.default.default.dc1").
	Targets map[string]Target
	// Approximations are settings served in HAProxy's closest terms.
	Approximations []Finding
}

// Finding is one chain setting with what is done about it.
type Finding struct {
	Setting string // as the config entry spells it, e.g. service-router Routes[0].Destination.RetryOn
	Value   string
	Why     string
}

func (f Finding) String() string { return fmt.Sprintf("%s = %s: %s", f.Setting, f.Value, f.Why) }

// Route is one service-router route (or the implicit catch-all).
type Route struct {
	Match *Match // nil: every request
	// PrefixRewrite replaces RewriteFrom, the matched PathPrefix (or the
	// whole PathExact), at the start of the path.
	PrefixRewrite, RewriteFrom string
	RequestTimeout             time.Duration // 0: the resolver's, else the listener's
	IdleTimeout                time.Duration
	Retry                      Retry
	RequestHeaders             HeaderModifiers
	// ResponseHeaders are applied to the answer of this route.
	ResponseHeaders HeaderModifiers
	Splits          []Split
}

// Match is a route's HTTP match; every part given must match.
type Match struct {
	PathExact, PathPrefix, PathRegex string
	Headers                          []HeaderMatch
	Query                            []QueryMatch
	Methods                          []string
}

// HeaderMatch matches one request header: Present, Exact, Prefix, Suffix
// or Regex (one of them), inverted if Invert.
type HeaderMatch struct {
	Name                         string
	Present                      bool
	Exact, Prefix, Suffix, Regex string
	Invert                       bool
}

// QueryMatch matches one query parameter: Present, Exact or Regex.
type QueryMatch struct {
	Name         string
	Present      bool
	Exact, Regex string
}

// Retry is when a request is sent again to another instance.
type Retry struct {
	NumRetries     int
	ConnectFailure bool
	// EmptyResponse: the connection was reset or closed before any
	// answer (Envoy's "reset").
	EmptyResponse bool
	StatusCodes   []int
}

// HeaderModifiers change headers: Set replaces, Add appends, Remove deletes.
type HeaderModifiers struct {
	Add, Set map[string]string
	Remove   []string
}

// Empty reports whether m changes nothing.
func (m HeaderModifiers) Empty() bool {
	return len(m.Add) == 0 && len(m.Set) == 0 && len(m.Remove) == 0
}

// Split is one weighted share of a route's requests.
type Split struct {
	Weight          int // out of TotalWeight
	Resolver        Resolver
	RequestHeaders  HeaderModifiers
	ResponseHeaders HeaderModifiers
}

// Resolver is where a split's requests go: Targets[0], and the next ones
// in order when the ones before have no healthy instance.
type Resolver struct {
	Targets        []string
	ConnectTimeout time.Duration
	RequestTimeout time.Duration
	Balance        Balance
}

// Balance is the load balancer policy, in HAProxy's terms.
type Balance struct {
	// Algorithm: roundrobin, leastconn, random, or hash (consistent
	// hashing on Keys, for Consul's ring_hash and maglev).
	Algorithm string
	Keys      []HashKey
}

// HashKey is one part of a consistent hash's key.
type HashKey struct {
	Kind string // header, cookie, query_parameter or source_ip
	Name string
}

// Target is one service (or subset of one) in a datacenter: one backend.
type Target struct {
	ID             string
	Service        string
	Subset         string // the subset's name ("": the whole service)
	Filter         string // the subset's filter, for the health query
	OnlyPassing    bool
	Namespace      string
	Partition      string
	Datacenter     string
	SNI            string
	ConnectTimeout time.Duration
}

// retryStatuses are the answers HAProxy 2.6's retry-on can retry on.
var retryStatuses = []int{401, 403, 404, 408, 425, 500, 501, 502, 503, 504}

// Compile reads Consul's answer to /v1/discovery-chain/<service>. An
// error lists every setting that cannot be honoured.
func Compile(body []byte) (*Plan, error) {
	c, err := decode(body)
	if err != nil {
		return nil, err
	}
	k := &compiler{c: c, plan: &Plan{Service: c.ServiceName, Protocol: c.Protocol, Targets: map[string]Target{}}}
	k.compile()
	if len(k.refused) > 0 {
		msgs := make([]string, len(k.refused))
		for i, f := range k.refused {
			msgs[i] = f.String()
		}
		return nil, &RefusedError{Service: c.ServiceName, Refused: k.refused, msg: strings.Join(msgs, "; ")}
	}
	return k.plan, nil
}

// RefusedError is a chain with settings haconnect cannot honour.
type RefusedError struct {
	Service string
	Refused []Finding
	msg     string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("discovery chain of %s refused: %s", e.Service, e.msg)
}

// IsRefused reports whether err is a chain refused for its settings.
func IsRefused(err error) bool {
	var r *RefusedError
	return errors.As(err, &r)
}

type compiler struct {
	c       *compiled
	plan    *Plan
	refused []Finding
}

func (k *compiler) refuse(setting, value, why string) {
	k.refused = append(k.refused, Finding{setting, value, why})
}

func (k *compiler) approximate(setting, value, why string) {
	k.plan.Approximations = append(k.plan.Approximations, Finding{setting, value, why})
}

func (k *compiler) compile() {
	c := k.c
	switch c.Protocol {
	case "tcp", "http", "http2", "grpc":
	default:
		k.refuse("service-defaults Protocol", c.Protocol, "not a protocol haconnect serves")
		return
	}
	if len(c.EnvoyExtensions) > 0 {
		k.refuse("service-defaults EnvoyExtensions", fmt.Sprint(len(c.EnvoyExtensions)), "Envoy extensions have no HAProxy equivalent")
	}
	start := c.Nodes[c.StartNode]
	if start == nil {
		k.refuse("StartNode", c.StartNode, "not among the chain's nodes")
		return
	}
	switch start.Type {
	case "router":
		for i, r := range start.Routes {
			k.route(i, r)
		}
	case "splitter":
		k.plan.Routes = []Route{{Splits: k.splits(start)}}
	case "resolver":
		k.plan.Routes = []Route{{Splits: []Split{{Weight: TotalWeight, Resolver: k.resolver(start)}}}}
	default:
		k.refuse("node type", start.Type, "unknown")
	}
	if n := len(k.plan.Routes); n > 0 && k.plan.Routes[n-1].Match != nil {
		k.refuse("service-router Routes", "no catch-all", "the last route must match every request (Consul adds one)")
	}
	for id, t := range c.Targets {
		k.target(id, t)
	}
}

func (k *compiler) route(i int, r *route) {
	where := fmt.Sprintf("service-router Routes[%d]", i)
	if r.Definition == nil {
		k.refuse(where, "no definition", "a route without a definition")
		return
	}
	var out Route
	if m := r.Definition.Match; m != nil && m.HTTP != nil {
		out.Match = k.match(where+".Match.HTTP", m.HTTP)
	}
	if d := r.Definition.Destination; d != nil {
		dw := where + ".Destination"
		out.PrefixRewrite = d.PrefixRewrite
		out.RequestTimeout, out.IdleTimeout = time.Duration(d.RequestTimeout), time.Duration(d.IdleTimeout)
		out.Retry = k.retry(dw, d)
		out.RequestHeaders = k.modifiers(dw+".RequestHeaders", d.RequestHeaders)
		out.ResponseHeaders = k.modifiers(dw+".ResponseHeaders", d.ResponseHeaders)
		if out.PrefixRewrite != "" {
			var h httpMatch
			if m := r.Definition.Match; m != nil && m.HTTP != nil {
				h = *m.HTTP
			}
			switch {
			case h.PathPrefix != "":
				out.RewriteFrom = h.PathPrefix
			case h.PathExact != "":
				out.RewriteFrom = h.PathExact
			default:
				k.refuse(dw+".PrefixRewrite", out.PrefixRewrite, "needs a PathPrefix or PathExact match")
			}
		}
	}
	next := k.c.Nodes[r.NextNode]
	switch {
	case next == nil:
		k.refuse(where+" NextNode", r.NextNode, "not among the chain's nodes")
	case next.Type == "splitter":
		out.Splits = k.splits(next)
	case next.Type == "resolver":
		out.Splits = []Split{{Weight: TotalWeight, Resolver: k.resolver(next)}}
	default:
		k.refuse(where+" NextNode", next.Type, "a route leads to a splitter or a resolver")
	}
	k.plan.Routes = append(k.plan.Routes, out)
}

// match reads a route's HTTP match. Consul's regular expressions are
// Envoy's RE2; HAProxy's are PCRE2, which reads every RE2 pattern the
// same way apart from a few escapes, so each is checked as RE2 here.
func (k *compiler) match(where string, h *httpMatch) *Match {
	m := &Match{PathExact: h.PathExact, PathPrefix: h.PathPrefix, PathRegex: h.PathRegex, Methods: h.Methods}
	k.regex(where+".PathRegex", h.PathRegex)
	for i, hm := range h.Header {
		w := fmt.Sprintf("%s.Header[%d]", where, i)
		if !token(hm.Name) {
			k.refuse(w+".Name", hm.Name, "not a header name")
		}
		k.regex(w+".Regex", hm.Regex)
		m.Headers = append(m.Headers, HeaderMatch{Name: strings.ToLower(hm.Name), Present: hm.Present, Exact: hm.Exact,
			Prefix: hm.Prefix, Suffix: hm.Suffix, Regex: hm.Regex, Invert: hm.Invert})
	}
	for i, q := range h.QueryParam {
		w := fmt.Sprintf("%s.QueryParam[%d]", where, i)
		if !token(q.Name) {
			k.refuse(w+".Name", q.Name, "not a query parameter name haconnect can match")
		}
		k.regex(w+".Regex", q.Regex)
		m.Query = append(m.Query, QueryMatch{Name: q.Name, Present: q.Present, Exact: q.Exact, Regex: q.Regex})
	}
	for _, meth := range h.Methods {
		if !token(meth) {
			k.refuse(where+".Methods", meth, "not a method")
		}
	}
	// The catch-all Consul appends is a PathPrefix "/" and nothing else.
	if m.PathExact == "" && (m.PathPrefix == "" || m.PathPrefix == "/") && m.PathRegex == "" &&
		len(m.Headers) == 0 && len(m.Query) == 0 && len(m.Methods) == 0 {
		return nil // matches every request
	}
	return m
}

func (k *compiler) regex(where, re string) {
	if re == "" {
		return
	}
	if _, err := regexp.Compile(re); err != nil {
		k.refuse(where, re, "not an RE2 regular expression: "+err.Error())
	}
}

// retry maps a route's retry policy onto HAProxy's retry-on. Envoy's
// conditions that HAProxy has: connect-failure (conn-failure), reset
// (empty-response: HAProxy retries when the server closed or reset
// before answering, not after a partial answer), 5xx and gateway-error
// (the 5xx answers retry-on knows: 500-504), and status codes among
// HAProxy's retryable ones. The rest (retriable-4xx's 409, refused-stream,
// gRPC statuses, envoy-ratelimited) are refused.
func (k *compiler) retry(where string, d *routeDestination) Retry {
	r := Retry{NumRetries: int(d.NumRetries), ConnectFailure: d.RetryOnConnectFailure}
	codes := map[int]bool{}
	for _, s := range d.RetryOnStatusCodes {
		if !slices.Contains(retryStatuses, int(s)) {
			k.refuse(where+".RetryOnStatusCodes", fmt.Sprint(s), fmt.Sprintf("HAProxy 2.6 retries only on %v", retryStatuses))
			continue
		}
		codes[int(s)] = true
	}
	for _, on := range d.RetryOn {
		switch on {
		case "connect-failure":
			r.ConnectFailure = true
		case "reset":
			r.EmptyResponse = true
			k.approximate(where+".RetryOn", on, "HAProxy retries when the server closed before answering (empty-response), not after part of an answer")
		case "5xx":
			for _, s := range []int{500, 501, 502, 503, 504} {
				codes[s] = true
			}
			k.approximate(where+".RetryOn", on, "HAProxy 2.6 retries 500-504, not 505-599")
		case "gateway-error":
			codes[502], codes[503], codes[504] = true, true, true
		default:
			k.refuse(where+".RetryOn", on, "no HAProxy 2.6 retry-on condition matches it")
		}
	}
	for s := range codes {
		r.StatusCodes = append(r.StatusCodes, s)
	}
	sort.Ints(r.StatusCodes)
	return r
}

func (k *compiler) modifiers(where string, h *headerModifiers) HeaderModifiers {
	if h == nil {
		return HeaderModifiers{}
	}
	for _, set := range []map[string]string{h.Add, h.Set} {
		for name, v := range set {
			if !token(name) {
				k.refuse(where, name, "not a header name")
			}
			if strings.ContainsAny(v, "\r\n\x00") {
				k.refuse(where+"."+name, v, "a header value with a line break")
			}
		}
	}
	for _, name := range h.Remove {
		if !token(name) {
			k.refuse(where+".Remove", name, "not a header name")
		}
	}
	return HeaderModifiers{Add: h.Add, Set: h.Set, Remove: h.Remove}
}

// splits reads a splitter. Consul flattens splitters into one, each
// split leading to a resolver; weights are percentages with two decimals.
func (k *compiler) splits(n *node) []Split {
	var out []Split
	total := 0
	for i, s := range n.Splits {
		where := fmt.Sprintf("service-splitter Splits[%d]", i)
		w := int(math.Round(s.Weight * 100))
		if w < 0 || w > TotalWeight {
			k.refuse(where+".Weight", fmt.Sprint(s.Weight), "out of 0-100")
			continue
		}
		total += w
		next := k.c.Nodes[s.NextNode]
		if next == nil || next.Type != "resolver" {
			k.refuse(where+" NextNode", s.NextNode, "a split leads to a resolver")
			continue
		}
		sp := Split{Weight: w, Resolver: k.resolver(next)}
		if d := s.Definition; d != nil {
			sp.RequestHeaders = k.modifiers(where+".RequestHeaders", d.RequestHeaders)
			sp.ResponseHeaders = k.modifiers(where+".ResponseHeaders", d.ResponseHeaders)
		}
		out = append(out, sp)
	}
	if total != TotalWeight && len(k.refused) == 0 {
		k.refuse("service-splitter Splits", fmt.Sprint(total), "weights must add up to 100")
	}
	return out
}

func (k *compiler) resolver(n *node) Resolver {
	where := "service-resolver " + n.Name
	r := n.Resolver
	if r == nil {
		k.refuse(where, "no resolver", "a resolver node without its resolver")
		return Resolver{}
	}
	out := Resolver{Targets: []string{r.Target}, ConnectTimeout: time.Duration(r.ConnectTimeout), RequestTimeout: time.Duration(r.RequestTimeout)}
	if f := r.Failover; f != nil {
		if f.Policy != nil && f.Policy.Mode != "" && f.Policy.Mode != "default" {
			k.refuse(where+" Failover.Policy.Mode", f.Policy.Mode, "only the order Consul gives is followed")
		}
		for _, t := range f.Targets {
			if !slices.Contains(out.Targets, t) {
				out.Targets = append(out.Targets, t)
			}
		}
	}
	for _, t := range out.Targets {
		if k.c.Targets[t] == nil {
			k.refuse(where+" target", t, "not among the chain's targets")
		}
	}
	out.Balance = k.balance(where+" LoadBalancer", n.LoadBalancer)
	return out
}

// balance maps Consul's load balancer onto HAProxy's balance algorithms:
// round_robin onto roundrobin, least_request onto leastconn (every server
// compared, not a choice among ChoiceCount), random onto random, ring_hash
// and maglev onto consistent hashing (hash-type consistent) of the hash
// policies' values concatenated in order.
func (k *compiler) balance(where string, lb *loadBalancer) Balance {
	if lb == nil || lb.Policy == "" {
		return Balance{Algorithm: "roundrobin"}
	}
	switch lb.Policy {
	case "round_robin":
		return Balance{Algorithm: "roundrobin"}
	case "least_request":
		if lb.LeastRequestConfig != nil && lb.LeastRequestConfig.ChoiceCount != 0 {
			k.approximate(where+".LeastRequestConfig.ChoiceCount", fmt.Sprint(lb.LeastRequestConfig.ChoiceCount),
				"HAProxy's leastconn compares every server")
		}
		return Balance{Algorithm: "leastconn"}
	case "random":
		return Balance{Algorithm: "random"}
	case "ring_hash", "maglev":
	default:
		k.refuse(where+".Policy", lb.Policy, "unknown")
		return Balance{}
	}
	if lb.RingHashConfig != nil {
		k.approximate(where+".RingHashConfig", "ring sizes", "HAProxy's consistent hash has a fixed ring per server weight")
	}
	b := Balance{Algorithm: "hash"}
	for i, h := range lb.HashPolicies {
		w := fmt.Sprintf("%s.HashPolicies[%d]", where, i)
		switch {
		case h.SourceIP:
			b.Keys = append(b.Keys, HashKey{Kind: "source_ip"})
		case h.Field == "header" || h.Field == "query_parameter":
			if !token(h.FieldValue) {
				k.refuse(w+".FieldValue", h.FieldValue, "not a name haconnect can match")
			}
			b.Keys = append(b.Keys, HashKey{Kind: h.Field, Name: h.FieldValue})
		case h.Field == "cookie":
			if c := h.CookieConfig; c != nil && (c.Session || c.TTL != 0 || c.Path != "") {
				k.refuse(w+".CookieConfig", "generated cookie", "HAProxy hashes a cookie the client sends; it does not generate one")
			}
			if !token(h.FieldValue) {
				k.refuse(w+".FieldValue", h.FieldValue, "not a cookie name")
			}
			b.Keys = append(b.Keys, HashKey{Kind: "cookie", Name: h.FieldValue})
		default:
			k.refuse(w+".Field", h.Field, "unknown")
		}
		if h.Terminal && i < len(lb.HashPolicies)-1 {
			k.approximate(w+".Terminal", "true", "every policy's value is part of the key, present or not")
		}
	}
	if len(b.Keys) == 0 {
		// Envoy hashes nothing stable without a policy: requests spread
		// at random. So does HAProxy.
		return Balance{Algorithm: "random"}
	}
	return b
}

func (k *compiler) target(id string, t *target) {
	where := "target " + id
	switch {
	case t.Peer != "":
		k.refuse(where+" Peer", t.Peer, "cluster peering is not supported")
		return
	case t.External:
		k.refuse(where+" External", "true", "a service behind a terminating gateway is not supported")
		return
	case t.MeshGateway.Mode == "local" || t.MeshGateway.Mode == "remote":
		k.refuse(where+" MeshGateway.Mode", t.MeshGateway.Mode, "mesh gateways are not supported")
		return
	}
	if t.Locality != nil && (t.Locality.Region != "" || t.Locality.Zone != "") {
		k.approximate(where+" Locality", t.Locality.Region+"/"+t.Locality.Zone, "instances are not preferred by locality")
	}
	k.plan.Targets[id] = Target{ID: id, Service: t.Service, Subset: t.ServiceSubset, Filter: t.Subset.Filter,
		OnlyPassing: t.Subset.OnlyPassing, Namespace: t.Namespace, Partition: t.Partition, Datacenter: t.Datacenter,
		SNI: t.SNI, ConnectTimeout: time.Duration(t.ConnectTimeout)}
}

// token reports whether s is a name (of a header, a method, a query
// parameter or a cookie) made of the characters names use in practice,
// letters, digits and "-_.": safe in an HAProxy rule unquoted.
func token(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.", r)) {
			return false
		}
	}
	return true
}
