package authz

import (
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func headerPerm(action api.IntentionAction, h api.IntentionHTTPHeaderPermission) *api.IntentionPermission {
	return &api.IntentionPermission{Action: action, HTTP: &api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{h}}}
}

func permissions(perms ...*api.IntentionPermission) *Permissions {
	return compilePermissions("api", &api.Intention{SourceName: "web", Permissions: perms}, nil)
}

// TestPseudoHeaders: header permissions on :method, :path, :authority and
// :scheme test what Envoy's do. Before, they looked for headers of those
// names, which never exist: a deny on them was skipped.
func TestPseudoHeaders(t *testing.T) {
	for _, tc := range []struct {
		name string
		perm api.IntentionHTTPHeaderPermission
		req  Request
		deny bool
	}{
		{":method exact", api.IntentionHTTPHeaderPermission{Name: ":method", Exact: "DELETE"}, Request{Method: "DELETE", Path: "/"}, true},
		{":method other", api.IntentionHTTPHeaderPermission{Name: ":method", Exact: "DELETE"}, Request{Method: "GET", Path: "/"}, false},
		{":path keeps the query", api.IntentionHTTPHeaderPermission{Name: ":path", Exact: "/a?debug=1"}, Request{Method: "GET", Path: "/a?debug=1"}, true},
		{":path prefix", api.IntentionHTTPHeaderPermission{Name: ":path", Prefix: "/admin"}, Request{Method: "GET", Path: "/admin/x"}, true},
		{":path regex", api.IntentionHTTPHeaderPermission{Name: ":path", Regex: `.*debug=.*`}, Request{Method: "GET", Path: "/x?debug=1"}, true},
		{":path is case-sensitive", api.IntentionHTTPHeaderPermission{Name: ":path", Prefix: "/admin"}, Request{Method: "GET", Path: "/ADMIN"}, false},
		{":authority is the Host header", api.IntentionHTTPHeaderPermission{Name: ":authority", Exact: "api.internal"}, Request{Method: "GET", Path: "/", Headers: headerMap{"host": {"api.internal"}}}, true},
		{":authority, other host", api.IntentionHTTPHeaderPermission{Name: ":authority", Exact: "api.internal"}, Request{Method: "GET", Path: "/", Headers: headerMap{"host": {"api"}}}, false},
		{":authority, no Host", api.IntentionHTTPHeaderPermission{Name: ":authority", Present: true, Invert: true}, Request{Method: "GET", Path: "/", Headers: headerMap{}}, true},
		{":scheme is https", api.IntentionHTTPHeaderPermission{Name: ":scheme", Exact: "https"}, Request{Method: "GET", Path: "/"}, true},
		{"names are case-insensitive", api.IntentionHTTPHeaderPermission{Name: ":Method", Exact: "PUT"}, Request{Method: "PUT", Path: "/"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := permissions(headerPerm(api.IntentionActionDeny, tc.perm), &api.IntentionPermission{Action: api.IntentionActionAllow})
			ok, r := p.Check(&tc.req, true)
			if tc.deny && (ok || r != ReasonL7PermissionDeny) {
				t.Fatalf("%v %s, want deny %s", ok, r, ReasonL7PermissionDeny)
			}
			if !tc.deny && !ok {
				t.Fatalf("%v %s, want allow", ok, r)
			}
		})
	}
}

// TestPseudoHeadersNeedNoHeaderBlock: tests on the method, path and scheme
// are answered from the request line; :authority needs the header block.
func TestPseudoHeadersNeedNoHeaderBlock(t *testing.T) {
	for name, want := range map[string]bool{":method": false, ":path": false, ":scheme": false, ":authority": true, "x-role": true} {
		p := permissions(headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: name, Present: true}))
		if p.NeedsHeaders != want {
			t.Errorf("%s: NeedsHeaders = %v, want %v", name, p.NeedsHeaders, want)
		}
	}
}

// TestUnknownPseudoHeaderFailsClosed: a rule on a pseudo-header a request
// does not have could never match; the intention's requests are denied
// rather than the rule skipped.
func TestUnknownPseudoHeaderFailsClosed(t *testing.T) {
	for _, name := range []string{":status", ":protocol", ":", ":path2"} {
		p := permissions(
			headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: name, Present: true}),
			&api.IntentionPermission{Action: api.IntentionActionAllow})
		if ok, r := p.Check(&Request{Method: "GET", Path: "/", Headers: headerMap{}}, true); ok || r != ReasonL7Invalid {
			t.Errorf("%s: %v %s, want deny %s", name, ok, r, ReasonL7Invalid)
		}
	}
}

// TestAmbiguousHeaderNames: a header spelled with '_' where a rule tests
// the '-' spelling (or the reverse) is refused (CVE-2024-10006).
func TestAmbiguousHeaderNames(t *testing.T) {
	p := permissions(
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: "X-Role", Exact: "admin"}),
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: "x_tenant", Exact: "other"}),
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: "x-both", Exact: "1"}),
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: "x_both", Exact: "1"}),
		&api.IntentionPermission{Action: api.IntentionActionAllow})
	for _, tc := range []struct {
		name    string
		headers headerMap
		want    Reason
	}{
		{"the tested spelling", headerMap{"x-role": {"user"}}, ReasonL7PermissionAllow},
		{"the tested spelling, denied", headerMap{"x-role": {"admin"}}, ReasonL7PermissionDeny},
		{"underscore for a dash", headerMap{"x_role": {"admin"}}, ReasonL7AmbiguousHeader},
		{"underscore beside the dash", headerMap{"x-role": {"user"}, "x_role": {"admin"}}, ReasonL7AmbiguousHeader},
		{"upper case underscore", headerMap{"X_ROLE": {"admin"}}, ReasonL7AmbiguousHeader},
		{"dash for an underscore", headerMap{"x-tenant": {"other"}}, ReasonL7AmbiguousHeader},
		{"both spellings tested", headerMap{"x_both": {"0"}, "x-both": {"0"}}, ReasonL7PermissionAllow},
		{"an untested name with underscores", headerMap{"x_other": {"1"}}, ReasonL7PermissionAllow},
		{"a longer name", headerMap{"x_role_2": {"1"}}, ReasonL7PermissionAllow},
		{"no headers", headerMap{}, ReasonL7PermissionAllow},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if ok, r := p.Check(&Request{Method: "GET", Path: "/", Headers: tc.headers}, true); r != tc.want || ok != (tc.want == ReasonL7PermissionAllow) {
				t.Fatalf("%v %s, want %s", ok, r, tc.want)
			}
		})
	}
	// Rules that test no header do not look at names.
	pathOnly := permissions(&api.IntentionPermission{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}})
	if ok, r := pathOnly.Check(&Request{Method: "GET", Path: "/", Headers: headerMap{"x_role": {"1"}}}, false); !ok {
		t.Fatalf("path-only rules: %v %s, want allow", ok, r)
	}
}

// FuzzL7HeaderNames checks the name comparison against a plain
// definition: the request is refused as ambiguous exactly when one of its
// header names is not a tested name but equals one once case is folded and
// every '_' is read as '-'.
func FuzzL7HeaderNames(f *testing.F) {
	f.Add("x-role", "x_role", "admin", "/admin?x=1")
	f.Add("x_role", "X-ROLE", "", "/")
	f.Add("x-role", "x-role", "admin", "/")
	f.Add(":path", "x_path", "/a", "/a")
	f.Add("x--", "x_-", "1", "/")
	f.Fuzz(func(t *testing.T, tested, sent, value, path string) {
		if !isASCII(tested) || !isASCII(sent) {
			return // header names are ASCII tokens; HAProxy passes no other
		}
		p := permissions(
			headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: tested, Exact: value}),
			&api.IntentionPermission{Action: api.IntentionActionAllow})
		ok, r := p.Check(&Request{Method: "GET", Path: path, Headers: headerMap{sent: {value}}}, true)
		if p.invalid != 0 {
			if ok {
				t.Fatalf("invalid permissions allowed a request")
			}
			return
		}
		fold := func(s string) string { return strings.ReplaceAll(strings.ToLower(s), "_", "-") }
		lower := strings.ToLower(tested)
		ambiguous := value != "" && !strings.HasPrefix(lower, ":") && strings.ContainsAny(lower, "-_") &&
			strings.ToLower(sent) != lower && fold(sent) == fold(lower)
		if ambiguous != (r == ReasonL7AmbiguousHeader) {
			t.Fatalf("tested %q, sent %q: %v %s, ambiguous by definition: %v", tested, sent, ok, r, ambiguous)
		}
		if ambiguous && ok {
			t.Fatalf("an ambiguous request was allowed")
		}
	})
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// TestHeaderRulesWithoutHeadersDeny: a request that arrives without its
// header block (its connection was admitted while the permissions tested
// no header) cannot be checked against a header rule; it is denied rather
// than the rule skipped.
func TestHeaderRulesWithoutHeadersDeny(t *testing.T) {
	p := permissions(
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: "x-evil", Present: true}),
		&api.IntentionPermission{Action: api.IntentionActionAllow})
	if ok, r := p.Check(&Request{Method: "GET", Path: "/"}, true); ok || r != ReasonL7BadRequest {
		t.Fatalf("no header block: %v %s, want deny %s", ok, r, ReasonL7BadRequest)
	}
	pseudo := permissions(
		headerPerm(api.IntentionActionDeny, api.IntentionHTTPHeaderPermission{Name: ":method", Exact: "DELETE"}),
		&api.IntentionPermission{Action: api.IntentionActionAllow})
	if ok, r := pseudo.Check(&Request{Method: "GET", Path: "/"}, true); !ok {
		t.Fatalf(":method needs no header block: %v %s, want allow", ok, r)
	}
}
