// Package render turns a sidecar's desired state into a complete HAProxy
// configuration. It is pure: the same Model always gives the same text,
// and Validate refuses a Model that would give a broken one.
package render

import (
	"fmt"
	"net"
	"strings"

	"github.com/haconnect/haconnect/plugin/chain"
	"github.com/haconnect/haconnect/spoa/authz"
)

// Protocols a listener may speak, as Consul names them. http2 and grpc
// are HTTP with HTTP/2 on every hop: h2 over mTLS between sidecars (ALPN),
// h2c to the app and from it, as Envoy does for them.
const (
	ProtocolTCP   = "tcp"
	ProtocolHTTP  = "http"
	ProtocolHTTP2 = "http2"
	ProtocolGRPC  = "grpc"
)

// IsHTTP reports whether a listener of protocol p works at L7 (HAProxy's
// mode http): every protocol but tcp.
func IsHTTP(p string) bool { return p != ProtocolTCP }

// IsH2 reports whether p speaks HTTP/2 on every hop.
func IsH2(p string) bool { return p == ProtocolHTTP2 || p == ProtocolGRPC }

// Mode is HAProxy's mode for a listener of protocol p.
func Mode(p string) string {
	if IsHTTP(p) {
		return "http"
	}
	return "tcp"
}

// Names in the rendered configuration that the runtime side relies on.
const (
	// InboundFrontend is the mTLS listener's frontend.
	InboundFrontend = "public_listener"
	// ConnTable tracks the inbound listener's open streams by caller: every
	// connection of a TCP listener, every upgraded stream (101) of an HTTP
	// one.
	ConnTable = "haconnect_conns"
	// UntrackedTable counts, by reason, the streams refused because
	// ConnTable could not track them (gpc0).
	UntrackedTable = "haconnect_untracked"
)

// ConnKeyLen is the longest key ConnTable holds whole,
// "<source address>:<port>|<caller SPIFFE ID>"; HAProxy cuts longer keys,
// and a cut key would be re-decided for another identity, so those
// streams are refused instead. It is the longest key of callers whose
// names stay within the limits Consul documents:
//
//	45  IPv6 source as text (INET6_ADDRSTRLEN - 1, "ffff:...:255.255.255.255")
//	 7  ":" port (5 digits) "|"
//	52  "spiffe://" + trust domain "<cluster UUID>.consul" (36 + 7)
//	67  "/ap/" + admin partition (a DNS label, 63)
//	67  "/ns/" + namespace (a DNS label, 63)
//	67  "/dc/" + datacenter (63: Consul checks only its characters, DNS needs a label)
//	261 "/svc/" + service (256, the longest ACL service identity; DNS needs 63)
//	---
//	566
//
// The catalog itself bounds neither service nor datacenter names: a caller
// past this is refused on upgrades and TCP streams, and counted.
const ConnKeyLen = 45 + 7 + (9 + 36 + 7) + (4 + 63) + (4 + 63) + (4 + 63) + (5 + 256)

// ConnTable names the stick table of open streams (for templates).
func (*Model) ConnTable() string { return ConnTable }

// UntrackedTable names the table counting untracked streams (for templates).
func (*Model) UntrackedTable() string { return UntrackedTable }

// ConnKeyLen is the ConnTable key length (for templates).
func (*Model) ConnKeyLen() int { return ConnKeyLen }

// TLS12Ciphers are the TLS 1.2 ciphers of every listener and server line,
// in order of preference: ECDHE (forward secrecy) with an AEAD, AES-128-GCM
// first, for ECDSA leaves (Consul's default) and RSA ones. Between sidecars
// TLS 1.2 is what is negotiated (see the template's global section).
const TLS12Ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" +
	"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:" +
	"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"

// TLS12Ciphers is the TLS 1.2 cipher list (for templates).
func (*Model) TLS12Ciphers() string { return TLS12Ciphers }

// TCPBufSize is tune.bufsize for a sidecar whose listeners are all tcp.
// A 16 KiB response (plus its headers) no longer fits HAProxy's default
// 16 KiB buffer: each hop then reads and writes it in two halves. With 32
// KiB it moves in one: measured on two TCP-mode hops with mTLS, 16 KiB
// bodies, about 15% less CPU per request at 32 connections and 10-20% at
// 512, the same at 100 B. HAProxy holds a buffer only while data is in
// flight, so idle connections cost nothing more. An HTTP stream pays for
// larger buffers instead (its L7 retries copy the whole buffer, and HTX
// works on it), so any HTTP listener keeps the default.
const TCPBufSize = 32768

// BufSize is the tune.bufsize to set, 0 for HAProxy's default (16 KiB):
// TCPBufSize when the inbound listener and every upstream are tcp.
func (m *Model) BufSize() int {
	if IsHTTP(m.Inbound.Protocol) {
		return 0
	}
	for _, u := range m.Upstreams {
		if IsHTTP(u.Protocol) {
			return 0
		}
	}
	return TCPBufSize
}

// CheckBackend names the HTTP inbound's backend that checks requests
// (authorization, L7 permissions) before the local app; the steady-state
// requests skip it for local_app (see the template's inbound frontend).
const CheckBackend = "local_app_check"

// CheckBackend names the checking backend (for templates).
func (*Model) CheckBackend() string { return CheckBackend }

// InboundFrontend names the inbound frontend (for templates).
func (*Model) InboundFrontend() string { return InboundFrontend }

// Model is everything the configuration depends on.
type Model struct {
	// Service is the destination service this sidecar fronts.
	Service string
	// Files and sockets, absolute paths.
	LeafFile    string // leaf certificate followed by its key
	RootsFile   string // the Connect CA roots
	SPOEFile    string // written next to the configuration
	AdminSocket string // runtime API
	// SPOAAddr is the authorization agent: "unix@/path" or "host:port".
	SPOAAddr string
	// SPOATLS, if set, reaches a TCP SPOAAddr with mutual TLS.
	SPOATLS *SPOATLS
	// SelfURI is this service's SPIFFE ID (By= of x-forwarded-client-cert).
	SelfURI string
	// AdminBind, if set, turns on telemetry: haconnect's metrics and
	// HAProxy's exporter at /metrics, the exporter alone at
	// /metrics/haproxy, the stats page at /stats.
	AdminBind string
	// AdminBindAlso, if set, is a second address of the same admin
	// listener: Proxy.Config envoy_stats_bind_addr beside a different
	// envoy_prometheus_bind_addr (Envoy serves /metrics on one and /stats
	// on the other; both paths are served on both here).
	AdminBindAlso string
	// ProcessMetricsURL, if set with AdminBind, is the sidecar process's
	// own /metrics (sidecar and embedded SPOA), appended to the admin
	// listener's /metrics so that one scrape target has all of them.
	ProcessMetricsURL string
	// LuaFile holds lua/haconnect.lua, always loaded: the upstream identity
	// check needs it, telemetry or not.
	LuaFile string
	// PeerMapFile is an empty map file. HAProxy fills it in memory with the
	// SPIFFE ID of each upstream certificate seen, by the certificate's
	// SHA-256.
	PeerMapFile string
	// RateLimitMapFile holds the rate limits' numbers (RateLimitMapText),
	// changed through the runtime API; needed with Inbound.RateLimits.
	RateLimitMapFile string
	// LatencyMapFile holds the latency buckets (LatencyMapText); needed
	// with telemetry (AdminBind) on an HTTP listener.
	LatencyMapFile string
	// L7MapDir, if set (an absolute directory), turns on native L7
	// matching on an HTTP/1.1 inbound listener with telemetry (l7native.go):
	// the L7Sets are loaded into three map files there, kept current
	// through the runtime API, and the requests of a caller whose
	// intention they hold are decided by HAProxy's rules, not the SPOA.
	L7MapDir string
	// L7Sets are the destination's native L7 sets (the authorizer's
	// NativeSets).
	L7Sets []*authz.NativeSet
	// Threads sets nbthread (0: HAProxy's default, one per CPU).
	Threads int
	// AccessLog logs every request/connection to stderr; off, the
	// per-request log line is not even built.
	AccessLog bool
	Inbound   Inbound
	Upstreams []Upstream
	// Exposed are the plain-HTTP listeners of Proxy.Expose (expose.go).
	Exposed []ExposedPath
}

// Inbound is the public mTLS listener in front of the local app.
type Inbound struct {
	BindAddr string
	BindPort int
	Protocol string
	// LocalAddr/LocalPort is the app.
	LocalAddr             string
	LocalPort             int
	LocalConnectTimeoutMS int
	// LocalRequestTimeoutMS bounds an HTTP request to the app (0: 30s).
	LocalRequestTimeoutMS int
	// LocalIdleTimeoutMS bounds an idle TCP stream or upgraded HTTP stream
	// (timeout tunnel; 0: the 1m client/server timeouts).
	LocalIdleTimeoutMS int
	// HandshakeTimeoutMS bounds a caller's TLS handshake (0: 1m). HAProxy
	// 2.6 has no timeout client-hs: the handshake is bounded by the
	// frontend's timeout client, so that is what it sets.
	HandshakeTimeoutMS int
	// MaxConnections caps the listener's concurrent connections (frontend
	// maxconn; 0: HAProxy's default).
	MaxConnections int
	// RateLimits budget the callers' requests and connections (nil: none;
	// ratelimit.go).
	RateLimits *RateLimits
}

// Upstream is a local listener that reaches a destination through the
// mesh.
type Upstream struct {
	Name       string // destination service
	Datacenter string
	BindAddr   string
	BindPort   int
	Protocol   string
	// ConnectTimeoutMS bounds a connection to an upstream instance, and a
	// request's wait in the queue when Limits are set.
	ConnectTimeoutMS int
	// Limits are Consul's upstream limits (circuit breakers); nil: none.
	Limits *Limits
	// PassiveHealth is Consul's passive_health_check; nil: off.
	PassiveHealth *PassiveHealth
	// PeerURI is the SPIFFE ID the upstream's certificate must carry.
	PeerURI string
	// SNI is the server name Consul gives this upstream's target (what an
	// Envoy sidecar sends, and what mesh and terminating gateways route
	// on). It is rendered as a comment only, not sent: HAProxy 2.6 checks
	// a server name it sends against the peer certificate's DNS SANs and
	// CN, and a Consul leaf carries neither (only its SPIFFE ID, as a URI
	// SAN), so every handshake would fail (README, "SNI").
	SNI string
	// Servers are slots, filled or empty; a slot keeps its name while the
	// instance in it lives, so changes can go through the runtime API.
	Servers []Server
	// Routes, when set, route the upstream's requests (HTTP) or
	// connections (TCP: one route, one split) as its discovery chain says
	// (Consul's service-router, -splitter and -resolver, compiled by
	// Consul, read by plugin/chain), to the backends of Targets; Servers
	// is then unused. Empty: the upstream's one backend, as without a
	// chain (Consul's default chain).
	Routes []Route
	// Targets are the chain's targets, one backend each.
	Targets []Target
}

// Route is one route of an upstream's discovery chain, in order; the last
// matches every request.
type Route struct {
	Match *chain.Match // nil: every request
	// PrefixRewrite replaces RewriteFrom at the start of the path.
	PrefixRewrite, RewriteFrom string
	// RequestTimeoutMS and IdleTimeoutMS bound the route's requests in
	// the target backend (0: the backend's own).
	RequestTimeoutMS, IdleTimeoutMS int
	Retry                           chain.Retry
	RequestHeaders, ResponseHeaders chain.HeaderModifiers
	Splits                          []Split
}

// Split is one weighted share of a route's requests.
type Split struct {
	Weight int // out of chain.TotalWeight
	// Targets are Target.IDs in failover order: a request goes to the
	// first whose backend has a usable server (all down: the first, 503).
	Targets                         []string
	RequestHeaders, ResponseHeaders chain.HeaderModifiers
}

// Target is one target of a discovery chain (a service, a subset of one,
// in a datacenter): a backend of its own, with its own slots and its own
// peer identity.
type Target struct {
	ID               string // Consul's target ID, e.g. "v1.api.default.default.dc1"
	PeerURI          string // the SPIFFE ID its instances must carry
	SNI              string // Consul's server name for it (a comment, see Upstream.SNI)
	ConnectTimeoutMS int
	Balance          chain.Balance
	Servers          []Server
}

// TargetBackend names the backend of an upstream's chain target: the
// upstream's backend, "::", the target's ID (which holds dots, never
// "::"), stable across renders.
func (u Upstream) TargetBackend(id string) string { return u.Backend() + "::" + id }

// Frontend and Backend name the upstream's sections, which the runtime
// API also uses. Two upstreams may share a destination name in different
// datacenters, so an explicit datacenter is part of the name, after a ':'
// (in no service or datacenter name, so names cannot collide). An upstream
// without one keeps the bare name, as before datacenters were named. Both
// depend only on the registration: they are the same on every render.
func (u Upstream) Frontend() string { return "upstream_listener_" + u.id() }

// Backend: see Frontend.
func (u Upstream) Backend() string { return "upstream_" + u.id() }

func (u Upstream) id() string {
	if u.Datacenter == "" {
		return u.Name
	}
	return u.Name + ":" + u.Datacenter
}

// Server is one upstream slot. An empty Addr is a free (disabled) slot.
type Server struct {
	Name string
	Addr string
	Port int
	// MaxConn is this slot's share of the upstream's concurrency limit
	// (0: none); like the address it changes through the runtime API.
	MaxConn int
}

// Limits are an upstream's circuit breakers, Envoy's per-cluster limits
// turned into what HAProxy counts (see plugin/sidecar/settings.go).
type Limits struct {
	// Concurrent is the most streams (TCP connections, HTTP requests) in
	// flight to the upstream at once; it is split over the filled slots
	// (Server.MaxConn), and a stream past it waits in the backend's queue.
	// 0: no limit.
	Concurrent int
	// MaxPending is how many may wait in that queue; a stream beyond is
	// refused at once (HTTP 503, TCP closed). Only with LimitPending.
	LimitPending bool
	MaxPending   int
}

// PassiveHealth takes an instance out after MaxFailures consecutive
// errors, for about EjectSeconds, and at most MaxEjectionPercent of the
// upstream's instances at once (at least one). For HTTP the sidecar
// counts the errors (plugin/sidecar/outlier.go); for TCP HAProxy does
// (observe layer4).
type PassiveHealth struct {
	MaxFailures        int
	EjectSeconds       int
	MaxEjectionPercent int
}

// SPOATLS is HAProxy's side of mutual TLS with an external authorization
// agent: its client certificate, the CA the agent's certificate must chain
// to, and the name it must carry (empty: not checked).
type SPOATLS struct {
	CertFile   string // certificate followed by its key
	CAFile     string
	ServerName string
}

// Validate refuses what would render a broken or dangerous configuration.
func (m *Model) Validate() error {
	var errs []string
	bad := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	if !validName(m.Service) {
		bad("service name %q", m.Service)
	}
	files := []struct{ name, v string }{{"leaf file", m.LeafFile}, {"roots file", m.RootsFile},
		{"SPOE file", m.SPOEFile}, {"admin socket", m.AdminSocket}, {"SPOA address", m.SPOAAddr},
		{"Lua file", m.LuaFile}, {"peer map file", m.PeerMapFile}}
	// The map file is also an argument of a Lua fetch: no separators.
	if strings.ContainsAny(m.PeerMapFile, ",()") {
		bad("peer map file %q", m.PeerMapFile)
	}
	if !strings.HasPrefix(m.SelfURI, "spiffe://") || strings.ContainsAny(m.SelfURI, " \t\n\"'#;%") {
		bad("own SPIFFE ID %q", m.SelfURI)
	}
	if t := m.SPOATLS; t != nil {
		files = append(files, struct{ name, v string }{"SPOA client certificate", t.CertFile},
			struct{ name, v string }{"SPOA CA file", t.CAFile})
		if t.ServerName != "" && !validName(t.ServerName) {
			bad("SPOA server name %q", t.ServerName)
		}
		if strings.HasPrefix(m.SPOAAddr, "unix@") {
			bad("SPOA TLS over a unix socket %q", m.SPOAAddr)
		}
	}
	for _, f := range files {
		if f.v == "" || strings.ContainsAny(f.v, " \t\n\"'#") {
			bad("%s %q", f.name, f.v)
		}
	}
	if m.AdminBind != "" {
		if err := checkHostPort(m.AdminBind); err != nil {
			bad("admin bind: %v", err)
		}
	}
	if a := m.AdminBindAlso; a != "" {
		if err := checkHostPort(a); err != nil {
			bad("second admin bind: %v", err)
		}
		if m.AdminBind == "" || a == m.AdminBind {
			bad("second admin bind %q without a different first one", a)
		}
	}
	if u := m.ProcessMetricsURL; u != "" {
		hp, ok := strings.CutPrefix(u, "http://")
		hp, ok2 := strings.CutSuffix(hp, "/metrics")
		if !ok || !ok2 || checkHostPort(hp) != nil {
			bad("process metrics URL %q (want http://<ip>:<port>/metrics)", u)
		}
	}
	if m.Threads < 0 || m.Threads > 64 {
		bad("threads %d (0-64)", m.Threads)
	}
	in := m.Inbound
	checkAddr(bad, "inbound bind address", in.BindAddr)
	checkPort(bad, "inbound port", in.BindPort)
	checkAddr(bad, "local service address", in.LocalAddr)
	checkPort(bad, "local service port", in.LocalPort)
	checkProtocol(bad, "inbound", in.Protocol)
	for _, v := range []struct {
		what string
		n    int
	}{{"local connect timeout", in.LocalConnectTimeoutMS}, {"local request timeout", in.LocalRequestTimeoutMS},
		{"local idle timeout", in.LocalIdleTimeoutMS}, {"handshake timeout", in.HandshakeTimeoutMS},
		{"max inbound connections", in.MaxConnections}} {
		if v.n < 0 {
			bad("%s %d is negative", v.what, v.n)
		}
	}
	ports := map[int]string{in.BindPort: "inbound listener"}
	sections := map[string]bool{}
	for _, u := range m.Upstreams {
		if !validName(u.Name) {
			bad("upstream name %q", u.Name)
		}
		what := "upstream " + u.Name
		if u.Datacenter != "" {
			// Part of section names (Frontend, Backend).
			if !validName(u.Datacenter) {
				bad("%s datacenter %q", what, u.Datacenter)
			}
			what += " (datacenter " + u.Datacenter + ")"
		}
		if sections[u.Backend()] {
			bad("%s is listed twice", what)
		}
		sections[u.Backend()] = true
		if u.SNI != "" && !validSNI(u.SNI) {
			bad("%s SNI %q", what, u.SNI)
		}
		checkAddr(bad, what+" bind address", u.BindAddr)
		checkPort(bad, what+" port", u.BindPort)
		checkProtocol(bad, what, u.Protocol)
		if other, dup := ports[u.BindPort]; dup {
			bad("%s port %d is also used by %s", what, u.BindPort, other)
		}
		ports[u.BindPort] = what
		if u.ConnectTimeoutMS < 0 {
			bad("%s connect timeout %d is negative", what, u.ConnectTimeoutMS)
		}
		if l := u.Limits; l != nil && (l.Concurrent < 0 || l.MaxPending < 0) {
			bad("%s limits %+v: negative", what, *l)
		}
		if h := u.PassiveHealth; h != nil && (h.MaxFailures < 1 || h.EjectSeconds < 1 || h.MaxEjectionPercent < 0 || h.MaxEjectionPercent > 100) {
			bad("%s passive health check %+v: max failures and ejection time must be at least 1", what, *h)
		}
		if !strings.HasPrefix(u.PeerURI, "spiffe://") || !spiffeChars(u.PeerURI) {
			bad("%s peer URI %q", what, u.PeerURI)
		}
		checkServers(bad, what, u.Servers)
		validateChain(bad, what, u, sections)
	}
	m.validateExposed(bad, ports)
	validateRateLimits(bad, in.RateLimits)
	if in.RateLimits != nil && !strings.HasPrefix(m.RateLimitMapFile, "/") {
		bad("rate limit map file %q is not an absolute path", m.RateLimitMapFile)
	}
	if m.L7MapDir != "" && (!strings.HasPrefix(m.L7MapDir, "/") || strings.ContainsAny(m.L7MapDir, " \t\n,()#\"'")) {
		bad("L7 map directory %q is not a plain absolute path", m.L7MapDir)
	}
	if m.AdminBind != "" && IsHTTP(in.Protocol) && !strings.HasPrefix(m.LatencyMapFile, "/") {
		bad("latency map file %q is not an absolute path", m.LatencyMapFile)
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid sidecar configuration: %s", strings.Join(errs, "; "))
	}
	return nil
}

func validName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// validSNI reports whether s is a host name TLS may carry (RFC 6066: at
// most 253 characters; here letters, digits, '-', '_' and '.'): it is
// written into the configuration.
func validSNI(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// spiffeChars reports whether s has only the characters a SPIFFE ID
// needs (letters, digits, "._-:/"): PeerURI is written into ACL patterns
// and a Lua fetch's arguments.
func spiffeChars(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-:/", r)) {
			return false
		}
	}
	return true
}

func checkPort(bad func(string, ...any), what string, p int) {
	if p < 1 || p > 65535 {
		bad("%s %d is out of range 1-65535", what, p)
	}
}

func checkAddr(bad func(string, ...any), what, a string) {
	if net.ParseIP(a) == nil {
		bad("%s %q is not an IP address", what, a)
	}
}

func checkProtocol(bad func(string, ...any), what, p string) {
	switch p {
	case ProtocolTCP, ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC:
	default:
		bad("%s protocol %q (want tcp, http, http2 or grpc)", what, p)
	}
}

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return err
	}
	if net.ParseIP(host) == nil {
		return fmt.Errorf("%q is not an IP address", host)
	}
	var p int
	if _, err := fmt.Sscanf(port, "%d", &p); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("port %q", port)
	}
	return nil
}

// hostPort formats an address for a HAProxy line. HAProxy splits on the
// last colon, so IPv6 addresses need no brackets.
func hostPort(addr string, port int) string {
	return fmt.Sprintf("%s:%d", addr, port)
}
