package sidecar

import (
	"sort"
	"strings"

	"github.com/haconnect/haconnect/internal/meshid"
	"github.com/haconnect/haconnect/plugin/render"
)

// upstreamSNI is the TLS server name Consul gives a service target, the
// one Envoy sends to it and mesh and terminating gateways route on
// (Consul's agent/connect/sni.go, ServiceSNI, read in v1.16):
//
//	<service>.<namespace>.<datacenter>.internal.<trust domain>                  default partition
//	<service>.<namespace>.<partition>.<datacenter>.internal-v1.<trust domain>   any other
//
// An empty namespace or partition is "default", as there. peer is the
// identity the upstream's certificate must carry (peerService), so the
// name and the SPIFFE ID checked always speak of the same target. This is
// the upstream's own name (the whole service); the targets of a discovery
// chain carry the name Consul gives each (with its subset: chain.go).
func upstreamSNI(peer meshid.Service) string {
	ns, ap := peer.Namespace, peer.Partition
	if ns == "" {
		ns = "default"
	}
	if ap == "" || ap == "default" {
		return strings.Join([]string{peer.Name, ns, peer.Datacenter, "internal", peer.TrustDomain.Name()}, ".")
	}
	return strings.Join([]string{peer.Name, ns, ap, peer.Datacenter, "internal-v1", peer.TrustDomain.Name()}, ".")
}

// logSNIs logs, once per upstream and name, Consul's SNI for each upstream
// of m and that it is not sent: with `verify required`, HAProxy 2.6 checks
// a name it sends against the peer certificate's DNS SANs and CN, and a
// Consul leaf has neither (only its SPIFFE ID, a URI SAN), so sending it
// would fail every handshake. Envoy sidecars accept connections without
// it; what needs it are gateways that route on it.
func (a *applier) logSNIs(m *render.Model) {
	if a.sniLogged == nil {
		a.sniLogged = map[string]string{}
	}
	for _, u := range m.Upstreams {
		k := upstreamKey(u)
		if u.SNI == "" || a.sniLogged[k] == u.SNI {
			continue
		}
		a.sniLogged[k] = u.SNI
		a.log.Info("upstream SNI not sent: HAProxy 2.6 would require it among the peer certificate's DNS names, which Consul leaves do not carry; the chain and the SPIFFE ID are verified, and gateways that route on SNI (mesh, terminating) cannot be reached",
			"upstream", k, "sni", u.SNI)
	}
}

// withoutGateways drops the terminating gateways from an upstream's
// instances and names them (comma-separated, sorted; "" if none). Consul
// answers a Connect health query for a service linked to a terminating
// gateway with the gateway's instances; the gateway picks the linked
// service by the SNI, which HAProxy 2.6 cannot send (upstreamSNI), so
// every connection to it would fail after a handshake. Left out, the
// upstream answers at once, and the log says why.
func withoutGateways(eps []endpoint) ([]endpoint, string) {
	var kept []endpoint
	seen := map[string]bool{}
	var names []string
	for _, e := range eps {
		if e.Gateway == "" {
			kept = append(kept, e)
			continue
		}
		if !seen[e.Gateway] {
			seen[e.Gateway] = true
			names = append(names, e.Gateway)
		}
	}
	if len(names) == 0 {
		return eps, ""
	}
	sort.Strings(names)
	return kept, strings.Join(names, ",")
}
