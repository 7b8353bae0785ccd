package render

import (
	"slices"
	"testing"

	"github.com/haconnect/haconnect/spoa/authz"
)

func sampleNativeSet() *authz.NativeSet {
	return &authz.NativeSet{ID: "0123456789abcdef", Source: "web", Rules: []authz.NativeRule{
		{Permission: 1, Allow: false, Path: authz.NativePath{Kind: authz.NativeExactPath, Value: "/admin"}},
		{Permission: 2, Allow: true, Methods: []string{"GET", "HEAD"}, Path: authz.NativePath{Kind: authz.NativePrefixPath, Value: "/api/"}},
		{Permission: 3, Allow: false, Path: authz.NativePath{Kind: authz.NativePrefixPath, Value: "/api/"}},
		{Permission: 4, Allow: true, Path: authz.NativePath{Kind: authz.NativePrefixPath, Value: "/api/public"}},
		{Permission: 5, Allow: true, Methods: []string{"GET"}},
	}}
}

// TestNativeEntries checks the maps' entries of a set: exact paths by
// method, prefixes carrying the smallest code of the prefixes they extend
// (so that /api/public, listed after /api/, still gets /api/'s code, as
// the first matching permission decides), the empty prefix of a
// permission with no path, and the sets map's entries, its gate last.
func TestNativeEntries(t *testing.T) {
	m := &Model{L7MapDir: "/x", AdminBind: "127.0.0.1:1", Inbound: Inbound{Protocol: ProtocolHTTP}, L7Sets: []*authz.NativeSet{sampleNativeSet()}}
	got := m.L7Maps()
	id := "0123456789abcdef|"
	want := L7Maps{
		// The set's methods, then its gate.
		Sets: []MapEntry{{id + "GET", "web"}, {id + "HEAD", "web"}, {id + "*", "web"}},
		// A permission with no method, under each method and "*".
		Exact: []MapEntry{{id + "GET:/admin", "2"}, {id + "HEAD:/admin", "2"}, {id + "*:/admin", "2"}},
		Prefix: []MapEntry{
			{id + "GET:/api/", "5"}, {id + "GET:/api/public", "5"}, {id + "GET:", "11"},
			{id + "HEAD:/api/", "5"}, {id + "HEAD:/api/public", "5"},
			{id + "*:/api/", "6"}, {id + "*:/api/public", "6"},
		},
	}
	if !slices.Equal(got.Sets, want.Sets) || !slices.Equal(got.Exact, want.Exact) || !slices.Equal(got.Prefix, want.Prefix) {
		t.Errorf("maps:\n got %+v\nwant %+v", got, want)
	}
	m.Inbound.Protocol = ProtocolHTTP2
	if m.L7Native() || len(m.L7Maps().Sets) != 0 {
		t.Error("native L7 matching on an HTTP/2 listener, whose streams hold sc2")
	}
}
