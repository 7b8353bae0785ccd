package sidecar

import (
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// l7MapCommands moves the native L7 maps HAProxy runs from prev's sets to
// next's (same shape: the same map files are loaded). A set is usable by
// HAProxy's rules only while its entry in the sets map is in: the entries
// of sets gone are removed after that entry, and a new set's entry is
// added after its permissions, so that no request sees half a set (it
// goes to the SPOA meanwhile).
func l7MapCommands(prev, next *render.Model) []haproxy.Command {
	if !prev.L7Native() || !next.L7Native() {
		return nil
	}
	was, now := prev.L7Maps(), next.L7Maps()
	inNext := map[string]bool{}
	for _, e := range now.Sets {
		inNext[e.Key] = true
	}
	var gone, kept []render.MapEntry
	for _, e := range was.Sets {
		if inNext[e.Key] {
			kept = append(kept, e)
		} else {
			gone = append(gone, e)
		}
	}
	var cmds []haproxy.Command
	// The sets gone first (mapCommands with nothing next deletes them).
	cmds = append(cmds, mapCommands(next.L7SetsMapFile(), gone, nil)...)
	cmds = append(cmds, mapCommands(next.L7ExactMapFile(), was.Exact, now.Exact)...)
	cmds = append(cmds, mapCommands(next.L7PrefixMapFile(), was.Prefix, now.Prefix)...)
	// The new sets last.
	cmds = append(cmds, mapCommands(next.L7SetsMapFile(), kept, now.Sets)...)
	return cmds
}
