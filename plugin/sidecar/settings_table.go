package sidecar

import (
	"fmt"
	"strings"
)

// field is a proxy registration field (not a Config key), or a Nomad
// setting that becomes one, for the README's table of every setting.
type field struct {
	Setting string
	Status  string // honoured, refused, not applicable
	Envoy   string
	Here    string
}

// fields are the registration's own fields and the Nomad settings around
// them; settings (settings.go) are the Config keys.
var fields = []field{
	{"Proxy.DestinationServiceName", "honoured", "the service the proxy fronts", "the destination authorized (SPOA target), the leaf's service"},
	{"Proxy.LocalServiceAddress, LocalServicePort", "honoured", "the local app cluster", "local_app server (a host name resolved in Go, kept resolved)"},
	{"Proxy.LocalServiceSocketPath", "refused", "the local app over a unix socket", "logged; the app is reached at LocalServiceAddress:LocalServicePort (HAProxy's container sees only its working directory)"},
	{"Proxy.LocalServicePorts", "refused", "several local app ports (multi-port services)", "logged; LocalServicePort is served"},
	{"Proxy.Mode = transparent, TransparentProxy.*", "refused", "outbound traffic redirected to the proxy", "logged; the registered upstreams are served on their local ports"},
	{"Proxy.MeshGateway.Mode, Upstreams.MeshGateway.Mode", "refused (local, remote)", "upstream traffic through mesh gateways", "logged; instances are dialed directly (mode none)"},
	{"Proxy.Expose.Paths", "honoured", "a plain-HTTP listener per path, exact path match", "the same, h2c both sides for http2; other paths 404"},
	{"Proxy.Expose.Checks", "honoured", "every HTTP and gRPC check rerouted through the proxy", "the same: ports polled from /v1/agent/checks"},
	{"Proxy.AccessLogs.Enabled", "honoured", "access logs", "HAProxy's httplog/tcplog lines on stderr (as -access-log)"},
	{"Proxy.AccessLogs.Type file, Path, JSONFormat, TextFormat", "refused", "where and how access logs are written", "logged; HAProxy's formats, on stderr"},
	{"Proxy.EnvoyExtensions", "refused", "Lua, Wasm, ext_authz ... filters", "logged by extension name"},
	{"Upstreams.DestinationName, LocalBindPort", "honoured", "an upstream listener and cluster", "an upstream frontend and backend"},
	{"Upstreams.LocalBindAddress", "honoured", "the upstream listener's address", "the same (an IP; a host name leaves the upstream out)"},
	{"Upstreams.Datacenter", "honoured", "instances in that datacenter", "the same; sections named after name and datacenter; unreadable: served empty (503), the rest kept current"},
	{"Upstreams.DestinationType = prepared_query", "refused", "instances from a prepared query", "the upstream is left out, logged at Error"},
	{"Upstreams.DestinationPeer", "refused", "an upstream in a peered cluster", "left out, logged at Error"},
	{"Upstreams.DestinationNamespace, DestinationPartition (not default)", "refused", "Consul Enterprise namespaces and partitions", "left out, logged at Error"},
	{"Upstreams.DestinationPort", "refused", "a named port of a multi-port service", "left out, logged at Error"},
	{"Upstreams.LocalBindSocketPath, LocalBindSocketMode", "refused", "an upstream listener on a unix socket", "left out, logged at Error"},
	{"upstream SNI (computed)", "not sent", "Envoy sends the target's SNI", "computed and logged, not sent: HAProxy 2.6 would check it against the peer's DNS SANs, which Consul leaves lack (see SNI)"},
	{"Nomad sidecar_task", "honoured", "the Envoy task", "haconnect's image and nomad-hook (jobs/)"},
	{"Nomad ${NOMAD_SECRETS_DIR}/si_token", "honoured", "the Consul token Envoy's bootstrap uses", "read when no -token, -token-file or CONSUL_HTTP_TOKEN is given"},
	{"Nomad check { expose = true }, expose { path {} }", "honoured", "Proxy.Expose.Paths", "as Proxy.Expose.Paths"},
	{"Nomad sidecar_service { proxy { config {} } }", "honoured", "Proxy.Config", "the Proxy.Config rows below"},
}

// SettingsTable is the README's table of every proxy setting, from fields
// and settings. TestREADMESettingsTable keeps the README equal to it.
func SettingsTable() string {
	var b strings.Builder
	b.WriteString("| setting | status | Envoy (as Consul configures it) | haconnect |\n|---|---|---|---|\n")
	cell := func(s string) string { return strings.ReplaceAll(s, "|", "\\|") }
	for _, f := range fields {
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s |\n", f.Setting, f.Status, cell(f.Envoy), cell(f.Here))
	}
	for _, s := range settings {
		name := "Proxy.Config." + s.Key
		if s.Upstream {
			name = "Upstreams.Config." + s.Key
		}
		status, here := "honoured", s.Here
		switch {
		case s.notApplicable():
			status, here = "not applicable", strings.TrimPrefix(here, "not applicable: ")
		case !s.Honoured:
			status, here = "refused", "logged; "+strings.TrimPrefix(here, "refused: ")
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s |\n", name, status, cell(s.Envoy), cell(here))
	}
	fmt.Fprintf(&b, "| any other `envoy_*` key in Proxy.Config or an upstream's Config | refused | (Envoy-specific) | logged once by name |\n")
	return b.String()
}
