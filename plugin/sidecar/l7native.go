package sidecar

import (
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// l7MapCommands moves the native L7 maps HAProxy runs from prev's sets to
// next's (same shape: the same map files are loaded). A set is usable by
// HAProxy's rules only while its "*" entry in the sets map is in
// (render.IsL7SetGate): a set gone loses it first, then its other
// entries, and a new set gets it last, so that no request sees half a
// set (it goes to the SPOA meanwhile).
func l7MapCommands(prev, next *render.Model) []haproxy.Command {
	if !prev.L7Native() || !next.L7Native() {
		return nil
	}
	was, now := prev.L7Maps(), next.L7Maps()
	inNext := map[string]bool{}
	for _, e := range now.Sets {
		inNext[e.Key] = true
	}
	var gates, gone, kept []render.MapEntry
	for _, e := range was.Sets {
		switch {
		case inNext[e.Key]:
			kept = append(kept, e)
		case render.IsL7SetGate(e):
			gates = append(gates, e)
		default:
			gone = append(gone, e)
		}
	}
	sets := next.L7SetsMapFile()
	var cmds []haproxy.Command
	cmds = append(cmds, mapCommands(sets, gates, nil)...)
	cmds = append(cmds, mapCommands(sets, gone, nil)...)
	cmds = append(cmds, mapCommands(next.L7ExactMapFile(), was.Exact, now.Exact)...)
	cmds = append(cmds, mapCommands(next.L7PrefixMapFile(), was.Prefix, now.Prefix)...)
	// The new sets' entries in their order: each set's gate last.
	cmds = append(cmds, mapCommands(sets, kept, now.Sets)...)
	return cmds
}
