package authz

import (
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// headerMap is a Headers for tests: names in lower case.
type headerMap map[string][]string

func (h headerMap) Lookup(name string) (string, bool) {
	v, ok := h[strings.ToLower(name)]
	return strings.Join(v, ","), ok
}

func (h headerMap) Names(f func([]byte) bool) {
	for name, values := range h {
		for range values {
			if !f([]byte(name)) {
				return
			}
		}
	}
}

// TestHeaderMatchFollowsEnvoy pins the cases where Envoy's header matcher
// (which Consul configures) is not the obvious reading: an absent header
// matches nothing but an inverted presence test; several values are joined.
func TestHeaderMatchFollowsEnvoy(t *testing.T) {
	for _, tc := range []struct {
		name    string
		perm    api.IntentionHTTPHeaderPermission
		headers headerMap
		want    bool
	}{
		{"present, absent", api.IntentionHTTPHeaderPermission{Name: "x", Present: true}, nil, false},
		{"present, there", api.IntentionHTTPHeaderPermission{Name: "x", Present: true}, headerMap{"x": {""}}, true},
		{"not present, absent", api.IntentionHTTPHeaderPermission{Name: "x", Present: true, Invert: true}, headerMap{}, true},
		{"not present, there", api.IntentionHTTPHeaderPermission{Name: "x", Present: true, Invert: true}, headerMap{"x": {"1"}}, false},
		{"not exact, absent: no match", api.IntentionHTTPHeaderPermission{Name: "x", Exact: "a", Invert: true}, headerMap{}, false},
		{"not exact, other value", api.IntentionHTTPHeaderPermission{Name: "x", Exact: "a", Invert: true}, headerMap{"x": {"b"}}, true},
		{"exact, joined values", api.IntentionHTTPHeaderPermission{Name: "X", Exact: "a,b"}, headerMap{"x": {"a", "b"}}, true},
		{"exact is case-sensitive", api.IntentionHTTPHeaderPermission{Name: "x", Exact: "a"}, headerMap{"x": {"A"}}, false},
		{"exact, ignore case", api.IntentionHTTPHeaderPermission{Name: "x", Exact: "a", IgnoreCase: true}, headerMap{"x": {"A"}}, true},
		{"exact wins over prefix", api.IntentionHTTPHeaderPermission{Name: "x", Exact: "ab", Prefix: "a"}, headerMap{"x": {"ac"}}, false},
		{"regex is anchored", api.IntentionHTTPHeaderPermission{Name: "x", Regex: "[a-z]+"}, headerMap{"x": {"ab1"}}, false},
		{"contains", api.IntentionHTTPHeaderPermission{Name: "x", Contains: "mid"}, headerMap{"x": {"a-mid-b"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hm, err := compileHeader(tc.perm)
			if err != nil {
				t.Fatal(err)
			}
			r := &Request{Method: "GET", Path: "/"}
			if tc.headers != nil {
				r.Headers = tc.headers
			}
			if got := hm.matches(r); got != tc.want {
				t.Fatalf("matches = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestPermissionsFailClosed(t *testing.T) {
	ixn := &api.Intention{SourceName: "web", Permissions: []*api.IntentionPermission{
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathRegex: "(unclosed"}},
	}}
	p := compilePermissions("api", ixn, nil)
	if ok, r := p.Check(&Request{Method: "GET", Path: "/"}, true); ok || r != ReasonL7Invalid {
		t.Fatalf("a permission that cannot be compiled: %v %s, want deny %s", ok, r, ReasonL7Invalid)
	}
	ixn.Permissions[0] = &api.IntentionPermission{Action: api.IntentionActionAllow,
		HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"},
		JWT:  &api.IntentionJWTRequirement{Providers: []*api.IntentionJWTProvider{{Name: "okta"}}}}
	p = compilePermissions("api", ixn, nil)
	if ok, r := p.Check(&Request{Method: "GET", Path: "/"}, true); ok || r != ReasonL7Unsupported {
		t.Fatalf("a permission that needs a JWT: %v %s, want deny %s", ok, r, ReasonL7Unsupported)
	}
}

// TestL7OnNonHTTPDestinationDenied covers a state Consul 1.16 refuses to
// write (it validates the protocol of destinations with permissions) but
// that a data plane must still not allow if it meets it.
func TestL7OnNonHTTPDestinationDenied(t *testing.T) {
	id, err := spiffeid.FromString("spiffe://td.consul/ns/default/dc/dc1/svc/web")
	if err != nil {
		t.Fatal(err)
	}
	ident, err := serviceIdentity(id)
	if err != nil {
		t.Fatal(err)
	}
	ixn := &api.Intention{SourceName: "web", Permissions: []*api.IntentionPermission{
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}},
	}}
	rules := &ruleSet{intentions: []*api.Intention{ixn}, perms: []*Permissions{compilePermissions("db", ixn, nil)}, protocol: "tcp"}
	noPolicy := func(*Identity) (bool, Reason, error) { t.Fatal("the default policy was asked"); return false, 0, nil }
	if d, cacheable, _ := evaluate(rules, "td.consul", &ident, noPolicy); d.Allow || d.Reason != ReasonL7NotHTTP || !cacheable {
		t.Fatalf("got allow=%v %s cacheable=%v, want a cacheable deny %s", d.Allow, d.Reason, cacheable, ReasonL7NotHTTP)
	}
}

// TestIgnoreCaseFoldsASCIIOnly: IgnoreCase folds ASCII letters as Envoy
// does; the Kelvin sign (U+212A), which Unicode folds to 'k', is another
// value.
func TestIgnoreCaseFoldsASCIIOnly(t *testing.T) {
	m, err := compileHeader(api.IntentionHTTPHeaderPermission{Name: "X-Unit", Exact: "k", IgnoreCase: true})
	if err != nil {
		t.Fatal(err)
	}
	for value, want := range map[string]bool{"k": true, "K": true, "\u212a": false, "kk": false} {
		if got := m.match.matches(value); got != want {
			t.Errorf("IgnoreCase exact %q against %q: %v, want %v", "k", value, got, want)
		}
	}
	if got := asciiLower("ÀBC\u212a"); got != "Àbc\u212a" {
		t.Errorf("asciiLower: %q", got)
	}
}
