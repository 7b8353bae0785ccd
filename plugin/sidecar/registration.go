package sidecar

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/plugin/render"
)

// proxyConfig is what the sidecar reads from a Connect proxy registration,
// in the render model's own terms: the inbound listener, and the upstreams
// as registered (buildModel adds each one's peer identity and slots).
type proxyConfig struct {
	Service string // destination service name
	render.Inbound
	Upstreams []render.Upstream
	// Expose is Proxy.Expose (expose.go).
	Expose exposeConfig
	// MetricsBinds are the distinct addresses of envoy_prometheus_bind_addr
	// and envoy_stats_bind_addr (settings.go), for the admin listener.
	MetricsBinds []string
	// AccessLogs is Proxy.AccessLogs.Enabled (proxy-defaults' or the
	// registration's): HAProxy's log line per request or connection, on
	// stderr, as -access-log.
	AccessLogs bool
	// Refused are the settings this registration asks for that haconnect
	// does not implement; the rest is served (see refusal).
	Refused []refusal
}

// refusal is one registered setting that is not served as asked. Rather
// than reject the whole registration (and keep serving a stale one, or
// nothing), the rest is served and the setting is logged by name:
//   - an upstream that cannot be served as asked (a prepared query, a
//     peer, a unix socket) is left out: its local port is not bound, so its
//     callers fail at once instead of reaching something else;
//   - a proxy-level mode (transparent, a mesh gateway mode) is served as the
//     default: explicit upstreams, dialed directly. Nothing is reached that
//     the registration's upstreams and the intentions do not allow.
type refusal struct {
	Setting  string // as Consul spells it, e.g. Proxy.MeshGateway.Mode
	Value    string
	Upstream string // the upstream it belongs to ("": the proxy's)
	Outcome  string // what is served instead
}

const (
	outcomeUpstreamLeftOut = "upstream left out: its local port is not bound"
	outcomeDirect          = "served as mode none: upstream instances are dialed directly"
	outcomeExplicit        = "served as the default mode: only the registered upstreams, on their local ports"
	outcomeIgnored         = "ignored: there is no transparent proxy to apply it to"
)

// meshGatewayRefused reports a mesh gateway mode other than none/default.
func meshGatewayRefused(setting, upstream string, mg api.MeshGatewayConfig) []refusal {
	switch mg.Mode {
	case api.MeshGatewayModeDefault, api.MeshGatewayModeNone:
		return nil
	}
	return []refusal{{Setting: setting, Value: string(mg.Mode), Upstream: upstream, Outcome: outcomeDirect}}
}

// readRegistration interprets a proxy registration the way Consul's
// built-in proxy and Envoy do: Proxy.Config "bind_address"/"bind_port"
// override the registered address and port (Nomad sets them), the local
// app defaults to 127.0.0.1, "protocol" defaults to tcp.
func readRegistration(svc *api.AgentService) (*proxyConfig, error) {
	if svc.Kind != api.ServiceKindConnectProxy || svc.Proxy == nil {
		return nil, fmt.Errorf("service %q is not a Connect proxy (kind %q)", svc.ID, svc.Kind)
	}
	p := svc.Proxy
	if p.DestinationServiceName == "" {
		return nil, fmt.Errorf("proxy %q names no destination service", svc.ID)
	}
	c := &proxyConfig{
		Service: p.DestinationServiceName,
		Inbound: render.Inbound{
			BindAddr:  "0.0.0.0",
			BindPort:  svc.Port,
			LocalAddr: orString(p.LocalServiceAddress, "127.0.0.1"),
			LocalPort: p.LocalServicePort,
		},
	}
	var err error
	cfg := p.Config
	if v, ok := cfg["bind_address"]; ok {
		c.BindAddr = fmt.Sprint(v)
		// A listener binds an IP address. Envoy refuses a host name there
		// too (a listener's socket address must be an IP), so a name is
		// refused, not resolved: binding whatever a name resolves to
		// could open the listener on another interface.
		if _, err := netip.ParseAddr(c.BindAddr); err != nil {
			return nil, fmt.Errorf("Proxy.Config bind_address %q is not an IP address: a listener binds an IP (use 0.0.0.0 or one of this host's addresses)", c.BindAddr)
		}
	}
	if c.BindPort, err = intOption(cfg, "bind_port", c.BindPort); err != nil {
		return nil, err
	}
	if c.Protocol, err = protocolOption(cfg, render.ProtocolTCP); err != nil {
		return nil, err
	}
	// Timeouts, the connection cap, the metrics listener, refused keys.
	if err := readProxySettings(c, cfg); err != nil {
		return nil, err
	}
	if p.Mode == api.ProxyModeTransparent {
		c.Refused = append(c.Refused, refusal{Setting: "Proxy.Mode", Value: string(p.Mode), Outcome: outcomeExplicit})
	}
	// Consul may return an empty TransparentProxy block for any proxy:
	// only settings actually given are refused.
	if tp := p.TransparentProxy; tp != nil {
		if tp.OutboundListenerPort != 0 {
			c.Refused = append(c.Refused, refusal{Setting: "Proxy.TransparentProxy.OutboundListenerPort",
				Value: strconv.Itoa(tp.OutboundListenerPort), Outcome: outcomeIgnored})
		}
		if tp.DialedDirectly {
			c.Refused = append(c.Refused, refusal{Setting: "Proxy.TransparentProxy.DialedDirectly",
				Value: "true", Outcome: outcomeIgnored})
		}
	}
	c.Refused = append(c.Refused, meshGatewayRefused("Proxy.MeshGateway.Mode", "", p.MeshGateway)...)
	c.Refused = append(c.Refused, readProxyFields(c, p)...)
	for _, u := range p.Upstreams {
		leftOut := func(setting, value string) {
			c.Refused = append(c.Refused, refusal{Setting: setting, Value: value, Upstream: u.DestinationName, Outcome: outcomeUpstreamLeftOut})
		}
		switch {
		case u.DestinationType != "" && u.DestinationType != api.UpstreamDestTypeService:
			leftOut("Upstreams.DestinationType", string(u.DestinationType))
			continue
		case u.DestinationPeer != "":
			leftOut("Upstreams.DestinationPeer", u.DestinationPeer)
			continue
		case u.LocalBindSocketPath != "":
			leftOut("Upstreams.LocalBindSocketPath", u.LocalBindSocketPath)
			continue
		case u.LocalBindAddress != "" && !isIP(u.LocalBindAddress):
			// A listener binds an IP address, as for bind_address.
			leftOut("Upstreams.LocalBindAddress", u.LocalBindAddress)
			continue
		case u.DestinationNamespace != "" && u.DestinationNamespace != "default":
			// Namespaces and partitions are Consul Enterprise's; the
			// peer identity and the health query would name the wrong one.
			leftOut("Upstreams.DestinationNamespace", u.DestinationNamespace)
			continue
		case u.DestinationPartition != "" && u.DestinationPartition != "default":
			leftOut("Upstreams.DestinationPartition", u.DestinationPartition)
			continue
		case u.DestinationPort != "":
			// A named port of a multi-port service (Consul 1.18+).
			leftOut("Upstreams.DestinationPort", u.DestinationPort)
			continue
		}
		// Consul copies the proxy's mode into every upstream: that one is
		// the proxy's setting, refused once above.
		if u.MeshGateway != p.MeshGateway {
			c.Refused = append(c.Refused, meshGatewayRefused("Upstreams.MeshGateway.Mode", u.DestinationName, u.MeshGateway)...)
		}
		uc := render.Upstream{
			Name:       u.DestinationName,
			Datacenter: u.Datacenter,
			BindAddr:   orString(u.LocalBindAddress, "127.0.0.1"),
			BindPort:   u.LocalBindPort,
		}
		if uc.Protocol, err = protocolOption(u.Config, c.Protocol); err != nil {
			return nil, fmt.Errorf("upstream %q: %w", u.DestinationName, err)
		}
		// connect_timeout_ms, limits, passive_health_check, refused keys.
		if err := readUpstreamSettings(c, &uc, u.Config); err != nil {
			return nil, fmt.Errorf("upstream %q: Config %w", u.DestinationName, err)
		}
		c.Upstreams = append(c.Upstreams, uc)
	}
	readExpose(c, svc)
	return c, nil
}

// refusalLog logs each refused setting once: the registration watch reads
// the registration again on every change, and a setting that stays refused
// is not news. A refusal that changes (another value, another upstream) is
// logged again.
type refusalLog struct {
	log     hclog.Logger
	proxyID string
	mu      sync.Mutex
	seen    map[refusal]bool
}

func newRefusalLog(log hclog.Logger, proxyID string) *refusalLog {
	return &refusalLog{log: log, proxyID: proxyID, seen: map[refusal]bool{}}
}

// read is readRegistration, logging the refusals not logged before.
func (l *refusalLog) read(svc *api.AgentService) (*proxyConfig, error) {
	c, err := readRegistration(svc)
	if c == nil {
		return c, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range c.Refused {
		if l.seen[r] {
			continue
		}
		l.seen[r] = true
		args := []any{"proxy_id", l.proxyID, "setting", r.Setting, "value", r.Value}
		if r.Upstream != "" {
			args = append(args, "upstream", r.Upstream)
		}
		args = append(args, "outcome", r.Outcome)
		msg := "registration setting refused (not supported): " + r.Setting
		switch {
		case r.Outcome == outcomeUpstreamLeftOut:
			l.log.Error(msg, args...) // a configured upstream does not work
		case strings.HasPrefix(r.Outcome, "not applicable: "):
			// Nothing a request meets depends on it (where metrics
			// are pushed, tracing): said once, not warned about.
			l.log.Info("registration setting not applicable: "+r.Setting, args...)
		default:
			l.log.Warn(msg, args...)
		}
	}
	return c, err
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

func orString(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// intOption reads a number that JSON decoding made a float64, or that an
// operator wrote as a string.
func intOption(cfg map[string]any, key string, def int) (int, error) {
	v, ok := cfg[key]
	if !ok || v == nil {
		return def, nil
	}
	switch n := v.(type) {
	case float64:
		if n != float64(int(n)) {
			return 0, fmt.Errorf("%s: %v is not an integer", key, v)
		}
		return int(n), nil
	case int:
		return n, nil
	case string:
		i, err := strconv.Atoi(strings.TrimSpace(n))
		if err != nil {
			return 0, fmt.Errorf("%s: %q is not an integer", key, n)
		}
		return i, nil
	}
	return 0, fmt.Errorf("%s: %v (%T) is not an integer", key, v, v)
}

// protocolOption reads Consul's protocol names: tcp, http, http2, grpc.
func protocolOption(cfg map[string]any, def string) (string, error) {
	v, ok := cfg["protocol"]
	if !ok || v == nil || v == "" {
		return def, nil
	}
	switch p := strings.ToLower(fmt.Sprint(v)); p {
	case "tcp":
		return render.ProtocolTCP, nil
	case "http":
		return render.ProtocolHTTP, nil
	case "http2":
		return render.ProtocolHTTP2, nil
	case "grpc":
		return render.ProtocolGRPC, nil
	default:
		return "", fmt.Errorf("protocol %q is not supported (tcp, http, http2 or grpc)", p)
	}
}

// readProxyFields reads the registration's Proxy fields beyond the
// listener, the mode and the upstreams: access logs are honoured where
// HAProxy can (on, to stderr), the rest is refused by name.
func readProxyFields(c *proxyConfig, p *api.AgentServiceConnectProxyConfig) []refusal {
	var out []refusal
	refuse := func(setting, value, outcome string) {
		out = append(out, refusal{Setting: setting, Value: value, Outcome: outcome})
	}
	if p.LocalServiceSocketPath != "" {
		// HAProxy's container (nomad-hook) sees only its working
		// directory, so the app's socket is not reachable from it.
		refuse("Proxy.LocalServiceSocketPath", p.LocalServiceSocketPath,
			"not applied: the local app is reached at LocalServiceAddress:LocalServicePort")
	}
	if len(p.LocalServicePorts) > 0 {
		refuse("Proxy.LocalServicePorts", fmt.Sprint(len(p.LocalServicePorts)),
			"not applied: one local app port, LocalServicePort, is served")
	}
	for _, e := range p.EnvoyExtensions {
		refuse("Proxy.EnvoyExtensions", e.Name, "not applied: Envoy extensions have no HAProxy equivalent")
	}
	if a := p.AccessLogs; a != nil && a.Enabled {
		c.AccessLogs = true
		if a.Type != "" && a.Type != api.StdErrLogSinkType {
			refuse("Proxy.AccessLogs.Type", string(a.Type), "not applied: HAProxy logs to the sidecar's stderr")
		}
		if a.Path != "" {
			refuse("Proxy.AccessLogs.Path", a.Path, "not applied: HAProxy logs to the sidecar's stderr")
		}
		if a.JSONFormat != "" || a.TextFormat != "" {
			refuse("Proxy.AccessLogs.Format", a.JSONFormat+a.TextFormat, "not applied: HAProxy's httplog and tcplog formats")
		}
	}
	return out
}
