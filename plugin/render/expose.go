package render

import (
	"fmt"
	"net"
	"strings"
)

// Protocols of an exposed path (Consul's Proxy.Expose.Paths[].Protocol).
const (
	ExposeHTTP  = "http"
	ExposeHTTP2 = "http2" // h2c on both sides, as Envoy's http2 cluster
)

// maxExposedPathLen bounds an exposed path: it is written into an ACL line.
const maxExposedPathLen = 1024

// ExposedPath is a plain-HTTP listener on the inbound's address that serves
// exactly one path of the local app, without mTLS or authorization: what
// Consul's Proxy.Expose gives Envoy (agent/xds/listeners.go,
// makeExposedCheckListener), so that a Consul health check or a metrics
// scraper outside the mesh reaches that one path. Any other path gets 404,
// as Envoy's exact-path route answers.
type ExposedPath struct {
	Path          string // exact, as the request's path (the query is not compared)
	ListenerPort  int
	LocalPathPort int    // on 127.0.0.1
	Protocol      string // ExposeHTTP or ExposeHTTP2
	// CheckID is set for a path exposed for a Consul check (Expose.Checks):
	// such a listener admits only loopback and AllowSources, as Envoy's.
	CheckID string
	// AllowSources are the addresses besides loopback that may reach a
	// check's listener (the Consul agent's LAN address).
	AllowSources []string
}

// ExposedName is the frontend and backend name of the path exposed on port.
func ExposedName(port int) string { return fmt.Sprintf("exposed_path_%d", port) }

// CheckExposedPath refuses what cannot be rendered safely: the path is
// written unquoted into an HAProxy ACL, so it must start with "/" and keep
// to the URL path characters that mean nothing to HAProxy's parser (no
// space, quote, backslash, '#', '$' or '{'); a query is not part of a path.
func CheckExposedPath(p ExposedPath) error {
	if !strings.HasPrefix(p.Path, "/") || len(p.Path) > maxExposedPathLen {
		return fmt.Errorf("path %q must start with / and be at most %d characters", p.Path, maxExposedPathLen)
	}
	for _, r := range p.Path {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/-._~!&*+,;=:@%()", r)) {
			return fmt.Errorf("path %q has a character haconnect does not expose (%q)", p.Path, r)
		}
	}
	if p.ListenerPort < 1 || p.ListenerPort > 65535 {
		return fmt.Errorf("path %q: listener port %d is out of range 1-65535", p.Path, p.ListenerPort)
	}
	if p.LocalPathPort < 1 || p.LocalPathPort > 65535 {
		return fmt.Errorf("path %q: local path port %d is out of range 1-65535", p.Path, p.LocalPathPort)
	}
	if p.Protocol != ExposeHTTP && p.Protocol != ExposeHTTP2 {
		return fmt.Errorf("path %q: protocol %q (want http or http2)", p.Path, p.Protocol)
	}
	for _, a := range p.AllowSources {
		if net.ParseIP(a) == nil {
			return fmt.Errorf("path %q: allowed source %q is not an IP address", p.Path, a)
		}
	}
	return nil
}

// validateExposed checks every exposed path and that no two listeners of
// the model share a port (Consul refuses duplicate listener ports in
// Expose.Paths too: "expose.paths: duplicate listener ports exposed").
func (m *Model) validateExposed(bad func(string, ...any), ports map[int]string) {
	for _, p := range m.Exposed {
		if err := CheckExposedPath(p); err != nil {
			bad("exposed %v", err)
			continue
		}
		what := "exposed path " + p.Path
		if other, dup := ports[p.ListenerPort]; dup {
			bad("%s port %d is also used by %s", what, p.ListenerPort, other)
		}
		ports[p.ListenerPort] = what
	}
}
