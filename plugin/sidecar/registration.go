package sidecar

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/plugin/render"
)

// proxyConfig is what the sidecar reads from a Connect proxy registration,
// in the render model's own terms: the inbound listener, and the upstreams
// as registered (buildModel adds each one's peer identity and slots).
type proxyConfig struct {
	Service string // destination service name
	render.Inbound
	Upstreams []render.Upstream
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
	}
	if c.BindPort, err = intOption(cfg, "bind_port", c.BindPort); err != nil {
		return nil, err
	}
	if c.Protocol, err = protocolOption(cfg, render.ProtocolTCP); err != nil {
		return nil, err
	}
	if c.LocalConnectTimeoutMS, err = intOption(cfg, "local_connect_timeout_ms", 0); err != nil {
		return nil, err
	}
	if c.LocalRequestTimeoutMS, err = intOption(cfg, "local_request_timeout_ms", 0); err != nil {
		return nil, err
	}
	for _, u := range p.Upstreams {
		if u.DestinationType != "" && u.DestinationType != api.UpstreamDestTypeService {
			return nil, fmt.Errorf("upstream %q: destination type %q is not supported (only services)", u.DestinationName, u.DestinationType)
		}
		if u.DestinationPeer != "" {
			return nil, fmt.Errorf("upstream %q: cluster peering is not supported", u.DestinationName)
		}
		if u.LocalBindSocketPath != "" {
			return nil, fmt.Errorf("upstream %q: unix socket listeners are not supported", u.DestinationName)
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
		if uc.ConnectTimeoutMS, err = intOption(u.Config, "connect_timeout_ms", 0); err != nil {
			return nil, fmt.Errorf("upstream %q: %w", u.DestinationName, err)
		}
		c.Upstreams = append(c.Upstreams, uc)
	}
	return c, nil
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

// protocolOption maps Consul's protocols onto what HAProxy serves here:
// http, http2 and grpc are handled as HTTP, tcp as TCP.
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
	default:
		return "", fmt.Errorf("protocol %q is not supported (tcp or http)", p)
	}
}
