package sidecar

import (
	"sort"

	"github.com/haconnect/haconnect/internal/dnsresolve"
)

// Host names. Consul accepts a host name as a service's address (Docker
// and Nomad's address_mode produce them), for an upstream instance and for
// the local app (LocalServiceAddress). HAProxy is only ever given IP
// addresses: the names are resolved in Go (internal/dnsresolve, which
// reads /etc/hosts and nsswitch as the rest of the host does; HAProxy's
// `resolvers` read neither) and kept resolved in the background, so that
//   - the render never waits on DNS: a name with no answer yet, or that
//     does not resolve, gives its instances no server, and the rest of the
//     upstream, the other upstreams, the leaf and the roots are applied;
//   - each address of a name fills a slot as an IP instance does, so a DNS
//     change is a runtime `set server addr` (no reload).
//
// The registration's own Address is not resolved: it is what other
// sidecars dial (their health answers), and this sidecar binds
// bind_address or 0.0.0.0, never it.

// resolveNames replaces the host names of snap's upstream instances with
// their addresses, and the local app's name with its address, from the
// resolver's last answers; it hands the resolver the names to keep
// resolved. It does not wait for DNS. The apply loop alone calls it.
func (s *Sidecar) resolveNames(snap *snapshot) {
	names := s.resolveEndpoints(snap.endpoints)
	// The instances of discovery chain targets, the same way.
	names = append(names, s.resolveEndpoints(snap.targetEndpoints)...)
	if reg := snap.reg; reg != nil {
		// Forget the last address of a name no longer registered.
		for name := range s.localAddrs {
			if name != reg.LocalAddr {
				delete(s.localAddrs, name)
			}
		}
	}
	if reg := snap.reg; reg != nil && dnsresolve.IsName(reg.LocalAddr) {
		name := reg.LocalAddr
		names = append(names, name)
		// The local app keeps its last address while its name does not
		// resolve: there is no other instance to send callers to, and a
		// name that DNS briefly loses must not stop the leaf's rotation.
		if addrs, _ := s.resolver.Addrs(name); len(addrs) > 0 {
			s.localAddrs[name] = addrs[0]
		}
		if a, ok := s.localAddrs[name]; ok {
			c := *reg
			c.LocalAddr = a
			snap.reg = &c
		} else {
			// Nothing can be served inbound before the app's address
			// is known: HAProxy is configured when the name first
			// resolves (the resolver logs a name that does not).
			snap.missing = append(snap.missing, "address of the local service "+name+" (DNS)")
		}
	}
	s.resolver.Want(names)
}

// resolveEndpoints replaces, in each list of byKey (a snapshot's map),
// the instances named by a host name with one instance per address of the
// name; it returns the names seen.
func (s *Sidecar) resolveEndpoints(byKey map[string][]endpoint) []string {
	var names []string
	for k, eps := range byKey {
		var out []endpoint
		seen := map[string]bool{}
		add := func(e endpoint) {
			if !seen[e.Key()] {
				seen[e.Key()] = true
				out = append(out, e)
			}
		}
		named := false
		for _, e := range eps {
			if !dnsresolve.IsName(e.Addr) {
				add(e)
				continue
			}
			named = true
			names = append(names, e.Addr)
			addrs, _ := s.resolver.Addrs(e.Addr)
			for _, a := range addrs {
				add(endpoint{Addr: a, Port: e.Port})
			}
		}
		if named {
			sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
			byKey[k] = out // a new map and slice: the watched state is untouched
		}
	}
	return names
}
