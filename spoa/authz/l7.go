package authz

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
)

// Request is what HAProxy sends about one HTTP request when the caller's
// intention carries HTTP permissions.
type Request struct {
	Method string
	// Path is the request path; a query string, if present, is ignored, as
	// Envoy's url_path matcher (which Consul uses) ignores it.
	Path string
	// Headers looks up request headers (nil when HAProxy sent none: the
	// permissions need none).
	Headers Headers
}

// Headers gives the request's headers by name.
type Headers interface {
	// Lookup returns every value of the header named (case-insensitively),
	// joined by "," as Envoy joins them, and whether the header is present.
	Lookup(name string) (string, bool)
}

// Permissions are the compiled HTTP permissions of one L7 intention, checked
// on every request of the callers it matches. Like Consul's RBAC rules for
// Envoy, the first permission that matches decides; a request no permission
// matches gets the ACL default policy.
type Permissions struct {
	rules []rule
	// NeedsHeaders says whether any rule tests a header: HAProxy sends the
	// header block only when it does.
	NeedsHeaders bool
	// invalid is set when a permission cannot be compiled (a regular
	// expression Go's RE2 refuses): every request of the intention's callers
	// is then denied, since the permission's meaning is unknown.
	invalid Reason
	noMatch [2]prometheus.Counter // [defaultAllow] requests no permission matched
}

type rule struct {
	allow   bool
	jwt     bool // needs a JWT, which haconnect cannot verify
	methods []string
	path    stringMatch
	headers []headerMatch
	counter prometheus.Counter
}

type matchKind uint8

const (
	matchAny matchKind = iota
	matchExact
	matchPrefix
	matchSuffix
	matchContains
	matchRegex
	matchPresent
)

type stringMatch struct {
	kind       matchKind
	value      string
	re         *regexp.Regexp
	ignoreCase bool
}

func (m *stringMatch) matches(s string) bool {
	v := s
	if m.ignoreCase {
		v = strings.ToLower(s)
	}
	switch m.kind {
	case matchExact:
		return v == m.value
	case matchPrefix:
		return strings.HasPrefix(v, m.value)
	case matchSuffix:
		return strings.HasSuffix(v, m.value)
	case matchContains:
		return strings.Contains(v, m.value)
	case matchRegex:
		return m.re.MatchString(s)
	default: // matchAny, matchPresent
		return true
	}
}

type headerMatch struct {
	name   string
	match  stringMatch
	invert bool
}

// matches follows Envoy's header matcher, which Consul configures: a header
// that is absent only matches an inverted presence test; otherwise the
// result of the test is inverted when asked.
func (h *headerMatch) matches(hs Headers) bool {
	if hs == nil {
		return h.invert && h.match.kind == matchPresent
	}
	v, ok := hs.Lookup(h.name)
	if !ok {
		return h.invert && h.match.kind == matchPresent
	}
	return h.match.matches(v) != h.invert
}

// compilePermissions turns an intention's permissions into rules. The
// counters are resolved here, once per intention change, so that checking a
// request allocates nothing.
func compilePermissions(target string, ixn *api.Intention, m *Metrics) *Permissions {
	p := &Permissions{rules: make([]rule, 0, len(ixn.Permissions))}
	source := ixn.SourceName
	if ns := orDefault(ixn.SourceNS); ns != "default" {
		source = ns + "/" + source
	}
	for i, perm := range ixn.Permissions {
		r := rule{allow: perm.Action == api.IntentionActionAllow, jwt: perm.JWT != nil && len(perm.JWT.Providers) > 0}
		if h := perm.HTTP; h != nil {
			r.methods = h.Methods
			var err error
			switch {
			case h.PathExact != "":
				r.path = stringMatch{kind: matchExact, value: h.PathExact}
			case h.PathPrefix != "":
				r.path = stringMatch{kind: matchPrefix, value: h.PathPrefix}
			case h.PathRegex != "":
				r.path, err = regexMatch(h.PathRegex)
			}
			if err != nil {
				p.invalid = ReasonL7Invalid
			}
			for _, hh := range h.Header {
				hm, err := compileHeader(hh)
				if err != nil {
					p.invalid = ReasonL7Invalid
				}
				if hm.match.kind != matchAny {
					r.headers = append(r.headers, hm)
				}
			}
			p.NeedsHeaders = p.NeedsHeaders || len(r.headers) > 0
		}
		r.counter = m.l7Counter(target, source, strconv.Itoa(i+1), r.allow)
		p.rules = append(p.rules, r)
	}
	p.noMatch[0] = m.l7Counter(target, source, "none", false)
	p.noMatch[1] = m.l7Counter(target, source, "none", true)
	return p
}

// compileHeader mirrors the order in which Consul picks the one test a
// header permission makes: exact, regex, prefix, suffix, contains, present.
// A permission with none of them is skipped, as Consul skips it.
func compileHeader(h api.IntentionHTTPHeaderPermission) (headerMatch, error) {
	hm := headerMatch{name: strings.ToLower(h.Name), invert: h.Invert}
	lower := func(s string) string {
		if h.IgnoreCase {
			return strings.ToLower(s)
		}
		return s
	}
	var err error
	switch {
	case h.Exact != "":
		hm.match = stringMatch{kind: matchExact, value: lower(h.Exact), ignoreCase: h.IgnoreCase}
	case h.Regex != "":
		hm.match, err = regexMatch(h.Regex)
	case h.Prefix != "":
		hm.match = stringMatch{kind: matchPrefix, value: lower(h.Prefix), ignoreCase: h.IgnoreCase}
	case h.Suffix != "":
		hm.match = stringMatch{kind: matchSuffix, value: lower(h.Suffix), ignoreCase: h.IgnoreCase}
	case h.Contains != "":
		hm.match = stringMatch{kind: matchContains, value: lower(h.Contains), ignoreCase: h.IgnoreCase}
	case h.Present:
		hm.match = stringMatch{kind: matchPresent}
	}
	return hm, err
}

// regexMatch compiles an Envoy safe_regex: RE2 syntax (Go's regexp is RE2),
// matched against the whole value.
func regexMatch(expr string) (stringMatch, error) {
	re, err := regexp.Compile(`^(?:` + expr + `)$`)
	if err != nil {
		return stringMatch{}, fmt.Errorf("regular expression %q: %w", expr, err)
	}
	return stringMatch{kind: matchRegex, re: re}, nil
}

// Check decides one request. defaultAllow is the ACL default policy, which
// decides when no permission matches.
func (p *Permissions) Check(r *Request, defaultAllow bool) (bool, Reason) {
	if p.invalid != 0 {
		return false, p.invalid
	}
	path, _, _ := strings.Cut(r.Path, "?")
	for i := range p.rules {
		rule := &p.rules[i]
		if !rule.matches(r.Method, path, r.Headers) {
			continue
		}
		rule.counter.Inc()
		if rule.jwt {
			// The permission also requires a valid JWT, which haconnect
			// cannot verify: fail closed.
			return false, ReasonL7Unsupported
		}
		if rule.allow {
			return true, ReasonL7PermissionAllow
		}
		return false, ReasonL7PermissionDeny
	}
	if defaultAllow {
		p.noMatch[1].Inc()
		return true, ReasonL7DefaultAllow
	}
	p.noMatch[0].Inc()
	return false, ReasonL7DefaultDeny
}

func (r *rule) matches(method, path string, hs Headers) bool {
	if len(r.methods) > 0 && !slices.Contains(r.methods, method) {
		return false
	}
	if r.path.kind != matchAny && !r.path.matches(path) {
		return false
	}
	for i := range r.headers {
		if !r.headers[i].matches(hs) {
			return false
		}
	}
	return true
}

// IsHTTP reports whether a Consul protocol carries HTTP requests that L7
// intentions can be checked against.
func IsHTTP(protocol string) bool {
	switch protocol {
	case "http", "http2", "grpc":
		return true
	}
	return false
}
