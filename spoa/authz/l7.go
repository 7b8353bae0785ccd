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
	// Names calls f with the name of each header, in order, until f
	// returns false. The slice is only valid during the call.
	Names(f func(name []byte) bool)
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
	// dashed lists the header names the rules test that contain '-' or '_'
	// (lower case): a request carrying a name that differs from one of
	// them only by '_' for '-' is denied, see ambiguousHeader.
	dashed []string
	// invalid is set when a permission cannot be compiled (a regular
	// expression Go's RE2 refuses): every request of the intention's callers
	// is then denied, since the permission's meaning is unknown.
	invalid Reason
	// native is the form HAProxy can match itself (nil: the SPOA decides
	// each request), see native.go.
	native  *NativeSet
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

// asciiLower folds ASCII letters only, as Envoy's ignore_case does:
// strings.ToLower would also fold, say, the Kelvin sign (U+212A) to 'k',
// so that a deny on "k" would catch it while the application, which
// compares bytes, sees another value (and an allow would let it through).
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

func (m *stringMatch) matches(s string) bool {
	v := s
	if m.ignoreCase {
		v = asciiLower(s)
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
	pseudo pseudoHeader
	match  stringMatch
	invert bool
}

// pseudoHeader is an HTTP/2 pseudo-header a permission may test, as Envoy
// lets it: Envoy's header map holds them next to the real headers.
type pseudoHeader uint8

const (
	notPseudo pseudoHeader = iota
	pseudoAuthority
	pseudoMethod
	pseudoPath
	pseudoScheme
)

var pseudoHeaders = map[string]pseudoHeader{
	":authority": pseudoAuthority,
	":method":    pseudoMethod,
	":path":      pseudoPath,
	":scheme":    pseudoScheme,
}

// value returns what the header test reads from r: for the pseudo-headers,
// the authority is the Host header (HTTP/1.1 carries it there), the method
// and the path with its query (Envoy's :path keeps the query) come from the
// request line as HAProxy normalized it, and the scheme is always https,
// the inbound listener being TLS only.
func (h *headerMatch) value(r *Request) (string, bool) {
	switch h.pseudo {
	case pseudoMethod:
		return r.Method, true
	case pseudoPath:
		return r.Path, true
	case pseudoScheme:
		return "https", true
	}
	if r.Headers == nil {
		return "", false
	}
	if h.pseudo == pseudoAuthority {
		return r.Headers.Lookup("host")
	}
	return r.Headers.Lookup(h.name)
}

// matches follows Envoy's header matcher, which Consul configures: a header
// that is absent only matches an inverted presence test; otherwise the
// result of the test is inverted when asked.
func (h *headerMatch) matches(r *Request) bool {
	v, ok := h.value(r)
	if !ok {
		return h.invert && h.match.kind == matchPresent
	}
	return h.match.matches(v) != h.invert
}

// compilePermissions turns an intention's permissions into rules. The
// counters are resolved here, once per intention change, so that checking a
// request allocates nothing.
func compilePermissions(destination string, ixn *api.Intention, m *Metrics) *Permissions {
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
				if hm.match.kind == matchAny {
					continue
				}
				r.headers = append(r.headers, hm)
				switch hm.pseudo {
				case notPseudo:
					p.NeedsHeaders = true
					if strings.ContainsAny(hm.name, "-_") && !slices.Contains(p.dashed, hm.name) {
						p.dashed = append(p.dashed, hm.name)
					}
				case pseudoAuthority:
					p.NeedsHeaders = true
				}
			}
		}
		r.counter = m.l7Counter(destination, source, strconv.Itoa(i+1), r.allow)
		p.rules = append(p.rules, r)
	}
	p.native = compileNative(destination, source, p)
	p.noMatch[0] = m.l7Counter(destination, source, "none", false)
	p.noMatch[1] = m.l7Counter(destination, source, "none", true)
	return p
}

// compileHeader mirrors the order in which Consul picks the one test a
// header permission makes: exact, regex, prefix, suffix, contains, present.
// A permission with none of them is skipped, as Consul skips it. A name
// starting with ':' must be one of the pseudo-headers a request has: any
// other could never match, and a deny on it would be silently skipped.
func compileHeader(h api.IntentionHTTPHeaderPermission) (headerMatch, error) {
	hm := headerMatch{name: asciiLower(h.Name), invert: h.Invert}
	if strings.HasPrefix(hm.name, ":") {
		hm.pseudo = pseudoHeaders[hm.name]
		if hm.pseudo == notPseudo {
			return hm, fmt.Errorf("header %q: not a pseudo-header of a request", h.Name)
		}
	}
	lower := func(s string) string {
		if h.IgnoreCase {
			return asciiLower(s)
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
	if p.NeedsHeaders && r.Headers == nil {
		// The connection was admitted when the permissions tested no
		// header, so HAProxy sends none until its next check: a header
		// rule cannot be evaluated, and skipping it could skip a deny.
		return false, ReasonL7BadRequest
	}
	if p.ambiguousHeader(r.Headers) {
		return false, ReasonL7AmbiguousHeader
	}
	path, _, _ := strings.Cut(r.Path, "?")
	for i := range p.rules {
		rule := &p.rules[i]
		if !rule.matches(r, path) {
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

// matches tests a request; path is its path without the query.
func (r *rule) matches(req *Request, path string) bool {
	if len(r.methods) > 0 && !slices.Contains(r.methods, req.Method) {
		return false
	}
	if r.path.kind != matchAny && !r.path.matches(path) {
		return false
	}
	for i := range r.headers {
		if !r.headers[i].matches(req) {
			return false
		}
	}
	return true
}

// ambiguousHeader reports whether the request carries a header whose name
// differs from a name the rules test only by '_' where the rule has '-', or
// the reverse (x_role beside a rule on x-role). Many servers and frameworks
// (CGI, WSGI, Rack, PHP, some proxies) fold both spellings into one name, so
// the app could read the header the rule never tested (CVE-2024-10006).
// Like Envoy's headers_with_underscores_action REJECT_REQUEST, such a
// request is refused, but only for the names the rules test. A name that
// is itself tested is not ambiguous: the rules decide on it.
func (p *Permissions) ambiguousHeader(hs Headers) bool {
	if len(p.dashed) == 0 || hs == nil {
		return false
	}
	found := false
	hs.Names(func(name []byte) bool {
		confused := false
		for _, tested := range p.dashed {
			switch foldDashes(name, tested) {
			case sameName:
				return true
			case dashesDiffer:
				confused = true
			}
		}
		found = confused
		return !found
	})
	return found
}

type nameFold uint8

const (
	otherName nameFold = iota
	sameName
	dashesDiffer
)

// foldDashes compares a header name with a tested name (lower case),
// ignoring ASCII case, and says whether they are the same name, or differ
// only where one has '_' and the other '-'.
func foldDashes(name []byte, tested string) nameFold {
	if len(name) != len(tested) {
		return otherName
	}
	result := sameName
	for i := 0; i < len(name); i++ {
		c, t := name[i], tested[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		switch {
		case c == t:
		case (c == '_' || c == '-') && (t == '_' || t == '-'):
			result = dashesDiffer
		default:
			return otherName
		}
	}
	return result
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
