package authz

import (
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestCompileNative pins which permissions HAProxy matches natively: only
// methods and exact or prefix paths. Anything else (a header or pseudo-
// header test, a regular expression, a JWT, a method or path a map key
// cannot carry) leaves the whole intention with the SPOA, and a change of
// any permission names a new set.
func TestCompileNative(t *testing.T) {
	perm := func(h api.IntentionHTTPPermission) *api.IntentionPermission {
		return &api.IntentionPermission{Action: api.IntentionActionAllow, HTTP: &h}
	}
	compile := func(perms ...*api.IntentionPermission) *NativeSet {
		return compilePermissions("api", &api.Intention{SourceName: "web", Permissions: perms}, nil).native
	}
	base := []*api.IntentionPermission{
		perm(api.IntentionHTTPPermission{PathExact: "/a", Methods: []string{"GET"}}),
		perm(api.IntentionHTTPPermission{PathPrefix: "/b/"}),
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{}},
	}
	set := compile(base...)
	if set == nil || len(set.ID) != 16 || set.Source != "web" || len(set.Rules) != 3 {
		t.Fatalf("native set: %+v", set)
	}
	want := []NativeRule{
		{Permission: 1, Allow: true, Methods: []string{"GET"}, Path: NativePath{NativeExactPath, "/a"}},
		{Permission: 2, Allow: true, Path: NativePath{NativePrefixPath, "/b/"}},
		{Permission: 3, Allow: false},
	}
	for i, r := range set.Rules {
		w := want[i]
		if r.Permission != w.Permission || r.Allow != w.Allow || r.Path != w.Path || len(r.Methods) != len(w.Methods) {
			t.Errorf("rule %d: %+v, want %+v", i+1, r, w)
		}
	}
	if again := compile(base...); again.ID != set.ID {
		t.Error("the same permissions named two sets")
	}
	changed := compile(base[0], base[1], perm(api.IntentionHTTPPermission{}))
	if changed == nil || changed.ID == set.ID {
		t.Error("a changed action kept the set's name")
	}
	jwt := &api.IntentionPermission{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"},
		JWT: &api.IntentionJWTRequirement{Providers: []*api.IntentionJWTProvider{{Name: "okta"}}}}
	for name, p := range map[string]*api.IntentionPermission{
		"header":         perm(api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: "x", Present: true}}}),
		"pseudo-header":  perm(api.IntentionHTTPPermission{Header: []api.IntentionHTTPHeaderPermission{{Name: ":method", Exact: "GET"}}}),
		"regex":          perm(api.IntentionHTTPPermission{PathRegex: "/a.*"}),
		"jwt":            jwt,
		"space in path":  perm(api.IntentionHTTPPermission{PathPrefix: "/a b"}),
		"; in path":      perm(api.IntentionHTTPPermission{PathExact: "/a;show info"}),
		"colon, method":  perm(api.IntentionHTTPPermission{Methods: []string{"GET:"}}),
		"invalid regexp": perm(api.IntentionHTTPPermission{PathRegex: "("}),
	} {
		if s := compile(base[0], p); s != nil {
			t.Errorf("%s: matched natively: %+v", name, s)
		}
	}
}
