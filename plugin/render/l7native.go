package render

import (
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/haconnect/haconnect/spoa/authz"
)

// Native L7 matching. A caller whose intention carries HTTP permissions
// that test only methods and exact or prefix paths (authz.NativeSet) is
// answered l7 = 3 or 4 by the SPOA, with its set's name (l7set); each of
// its requests is then decided by map lookups instead of a SPOE round trip
// (about 20 us a request here). Once its decision is fresh, a request whose
// set's gate is in goes to local_app_l7, which has no SPOE filter. The
// maps:
//
//   - l7_sets.map: "<set>|<method>" -> the intention's source, for each
//     method a permission of the set names, and "<set>|*" for any other.
//     A request's method is looked up first, "*" otherwise: the method
//     part of the keys below. The set's entries here are added after its
//     other entries ("<set>|*", the gate, last) and removed before them
//     (the gate first), and the entry a request found its set by is looked
//     up again after its lookups: still in, they saw the whole set. A
//     request whose set is missing (not loaded yet, withdrawn because the
//     intention changed or Consul went stale) is sent to the SPOA, which
//     decides with the same permissions, or denied in local_app_l7, which
//     has no SPOA to ask (a change racing the request on another thread).
//   - l7_exact.map (map_str): "<set>|<method>:<path>" -> code, for exact
//     paths.
//   - l7_prefix.map (map_beg): "<set>|<method>:<prefix>" -> code, for
//     prefixes (an empty prefix for a permission with no path).
//
// A permission that names no method is listed under every method of the
// set and under "*". A code is the permission's number times two, plus
// one for allow: the smaller code of the two lookups decides, as the first
// permission that matches does in Consul. Each prefix entry carries the
// smallest code of the prefixes it extends (a prefix of a path matches
// any longer one, so both match the same paths): the answer is the same
// whether HAProxy returns the longest matching prefix or the first one
// listed. No match: the default policy, code 0 (deny, l7 = 3) or 1
// (allow, l7 = 4).
//
// Requests decided so are counted in the haconnect_l7 table by
// "<source>|<destination>|<code>" (sc2: an HTTP/1.1 listener uses it
// only for upgraded streams, which never take this path), which the
// scraper exports as haconnect_l7_requests_total.

// L7 map file names, in Model.L7MapDir.
const (
	l7SetsMap   = "l7_sets.map"
	l7ExactMap  = "l7_exact.map"
	l7PrefixMap = "l7_prefix.map"
	// l7CountTable counts the requests decided natively.
	l7CountTable = "haconnect_l7"
)

// L7CountTable names the table counting the requests decided natively.
func (m *Model) L7CountTable() string { return l7CountTable }

// L7Backend is the inbound backend of the requests matched natively once
// their caller's decision is fresh.
func (m *Model) L7Backend() string { return "local_app_l7" }

// L7Native reports whether the configuration matches native L7 sets:
// L7MapDir set, an HTTP/1.1 inbound listener (h2 and gRPC listeners use
// sc2 for every stream), and telemetry on (AdminBind), which exports the
// counts.
func (m *Model) L7Native() bool {
	return m.L7MapDir != "" && m.Inbound.Protocol == ProtocolHTTP && m.AdminBind != ""
}

// L7SetsMapFile, L7ExactMapFile and L7PrefixMapFile are the maps' paths.
func (m *Model) L7SetsMapFile() string   { return filepath.Join(m.L7MapDir, l7SetsMap) }
func (m *Model) L7ExactMapFile() string  { return filepath.Join(m.L7MapDir, l7ExactMap) }
func (m *Model) L7PrefixMapFile() string { return filepath.Join(m.L7MapDir, l7PrefixMap) }

// L7Maps are the three maps' entries for m.L7Sets (none when native
// matching is off), in the order they are loaded.
type L7Maps struct{ Sets, Exact, Prefix []MapEntry }

// L7Maps builds the maps' entries.
func (m *Model) L7Maps() L7Maps {
	var out L7Maps
	if !m.L7Native() {
		return out
	}
	for _, set := range m.L7Sets {
		sets, exact, prefix := nativeEntries(set)
		out.Sets = append(out.Sets, sets...)
		out.Exact = append(out.Exact, exact...)
		out.Prefix = append(out.Prefix, prefix...)
	}
	return out
}

// anyMethod is the method part of the keys for a method no permission of
// the set names.
const anyMethod = "*"

// nativeEntries are one set's entries in the three maps; its "*" entry in
// the sets map comes last.
func nativeEntries(set *authz.NativeSet) (sets, exact, prefix []MapEntry) {
	type pfx struct {
		value string
		code  int
	}
	var methods []string // the methods named, in order of appearance
	for _, r := range set.Rules {
		for _, meth := range r.Methods {
			if !slices.Contains(methods, meth) {
				methods = append(methods, meth)
			}
		}
	}
	spaces := append(slices.Clone(methods), anyMethod)
	exactSeen := map[string]bool{}
	prefixes := map[string][]pfx{} // by method space
	for _, r := range set.Rules {
		code := r.Permission * 2
		if r.Allow {
			code++
		}
		ms := r.Methods
		if len(ms) == 0 {
			ms = spaces
		}
		for _, meth := range ms {
			if r.Path.Kind == authz.NativeExactPath {
				key := set.ID + "|" + meth + ":" + r.Path.Value
				if !exactSeen[key] { // the first permission wins
					exactSeen[key] = true
					exact = append(exact, MapEntry{key, strconv.Itoa(code)})
				}
				continue
			}
			prefixes[meth] = append(prefixes[meth], pfx{r.Path.Value, code}) // any path: ""
		}
	}
	for _, meth := range spaces {
		list := prefixes[meth]
		seen := map[string]bool{}
		for _, p := range list {
			if seen[p.value] {
				continue
			}
			seen[p.value] = true
			best := p.code
			for _, q := range list {
				if strings.HasPrefix(p.value, q.value) {
					best = min(best, q.code)
				}
			}
			prefix = append(prefix, MapEntry{set.ID + "|" + meth + ":" + p.value, strconv.Itoa(best)})
		}
	}
	for _, meth := range spaces {
		sets = append(sets, MapEntry{set.ID + "|" + meth, set.Source})
	}
	return sets, exact, prefix
}

// IsL7SetGate reports whether a sets map entry is a set's "*" entry, which
// makes the set usable: added last, removed first.
func IsL7SetGate(e MapEntry) bool { return strings.HasSuffix(e.Key, "|"+anyMethod) }

// MapText renders entries as a map file.
func MapText(entries []MapEntry) string {
	var b strings.Builder
	for _, e := range entries {
		b.WriteString(e.Key)
		b.WriteByte(' ')
		b.WriteString(e.Value)
		b.WriteByte('\n')
	}
	return b.String()
}

// L7MapFiles are the three maps' file names (in L7MapDir) and contents,
// for the sidecar to write before HAProxy (re)loads them.
func (m *Model) L7MapFiles() [][2]string {
	if m.L7MapDir == "" {
		return nil
	}
	maps := m.L7Maps()
	return [][2]string{{l7SetsMap, MapText(maps.Sets)}, {l7ExactMap, MapText(maps.Exact)}, {l7PrefixMap, MapText(maps.Prefix)}}
}

// SameL7Sets reports whether two lists name the same sets in the same
// order.
func SameL7Sets(a, b []*authz.NativeSet) bool {
	return slices.EqualFunc(a, b, func(x, y *authz.NativeSet) bool { return x.ID == y.ID })
}
