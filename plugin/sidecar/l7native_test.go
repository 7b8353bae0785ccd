package sidecar

import (
	"strings"
	"testing"

	"github.com/haconnect/haconnect/plugin/render"
	"github.com/haconnect/haconnect/spoa/authz"
)

// TestL7MapCommandsNeverShowHalfASet: when an intention's permissions
// change, the old set's gate ("<set>|*" in the sets map) goes first, and
// the new set's comes after all its other entries, so that a request
// finds either a whole set or none (and then asks the SPOA). Its method
// entries are removed after the gate too: without the gate a method the
// set does not name finds nothing, while a named one still finds the
// whole set.
func TestL7MapCommandsNeverShowHalfASet(t *testing.T) {
	set := func(id string, allow bool) *authz.NativeSet {
		return &authz.NativeSet{ID: id, Source: "web", Rules: []authz.NativeRule{
			{Permission: 1, Allow: allow, Methods: []string{"GET"}, Path: authz.NativePath{Kind: authz.NativePrefixPath, Value: "/flip"}},
			{Permission: 2, Allow: true, Path: authz.NativePath{Kind: authz.NativeExactPath, Value: "/"}},
		}}
	}
	model := func(sets ...*authz.NativeSet) *render.Model {
		return &render.Model{L7MapDir: "/d", AdminBind: "127.0.0.1:1", Inbound: render.Inbound{Protocol: render.ProtocolHTTP}, L7Sets: sets}
	}
	keep := set("1111111111111111", true)
	var got []string
	for _, c := range l7MapCommands(model(keep, set("aaaaaaaaaaaaaaaa", true)), model(keep, set("bbbbbbbbbbbbbbbb", false))) {
		got = append(got, c.String())
	}
	want := []string{
		"del map /d/l7_sets.map aaaaaaaaaaaaaaaa|*",
		"del map /d/l7_sets.map aaaaaaaaaaaaaaaa|GET",
		"add map /d/l7_exact.map bbbbbbbbbbbbbbbb|GET:/ 5",
		"add map /d/l7_exact.map bbbbbbbbbbbbbbbb|*:/ 5",
		"del map /d/l7_exact.map aaaaaaaaaaaaaaaa|*:/",
		"del map /d/l7_exact.map aaaaaaaaaaaaaaaa|GET:/",
		"add map /d/l7_prefix.map bbbbbbbbbbbbbbbb|GET:/flip 2",
		"del map /d/l7_prefix.map aaaaaaaaaaaaaaaa|GET:/flip",
		"add map /d/l7_sets.map bbbbbbbbbbbbbbbb|GET web",
		"add map /d/l7_sets.map bbbbbbbbbbbbbbbb|* web",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("commands:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if cmds := l7MapCommands(model(keep), model(keep)); len(cmds) != 0 {
		t.Errorf("no change: %v", cmds)
	}
}
