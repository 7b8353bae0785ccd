package sidecar

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// refusedRegistration asks for every setting haconnect refuses, beside one
// upstream it serves.
func refusedRegistration() *api.AgentService {
	return &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServicePort: 8080,
			Mode:             api.ProxyModeTransparent,
			TransparentProxy: &api.TransparentProxyConfig{OutboundListenerPort: 15001, DialedDirectly: true},
			MeshGateway:      api.MeshGatewayConfig{Mode: api.MeshGatewayModeLocal},
			Upstreams: []api.Upstream{
				// as Consul returns it: the proxy's mode copied in
				{DestinationName: "api", LocalBindPort: 9191, MeshGateway: api.MeshGatewayConfig{Mode: api.MeshGatewayModeLocal}},
				{DestinationType: api.UpstreamDestTypePreparedQuery, DestinationName: "geo-db", LocalBindPort: 9192},
				{DestinationName: "billing", DestinationPeer: "other", LocalBindPort: 9193},
				{DestinationName: "cache", LocalBindSocketPath: "/tmp/cache.sock"},
				{DestinationName: "search", Datacenter: "dc2", LocalBindPort: 9194,
					MeshGateway: api.MeshGatewayConfig{Mode: api.MeshGatewayModeRemote}},
			},
		},
	}
}

func TestReadRegistrationRefusesUnsupportedSettings(t *testing.T) {
	c, err := readRegistration(refusedRegistration())
	if err != nil {
		t.Fatalf("the registration was rejected whole: %v", err)
	}
	var served []string
	for _, u := range c.Upstreams {
		served = append(served, upstreamKey(u))
	}
	if !reflect.DeepEqual(served, []string{"api", "search@dc2"}) {
		t.Fatalf("served upstreams %v, want api and search@dc2 (the others left out)", served)
	}
	want := []refusal{
		{Setting: "Proxy.Mode", Value: "transparent", Outcome: outcomeExplicit},
		{Setting: "Proxy.TransparentProxy.OutboundListenerPort", Value: "15001", Outcome: outcomeIgnored},
		{Setting: "Proxy.TransparentProxy.DialedDirectly", Value: "true", Outcome: outcomeIgnored},
		{Setting: "Proxy.MeshGateway.Mode", Value: "local", Outcome: outcomeDirect},
		{Setting: "Upstreams.DestinationType", Value: "prepared_query", Upstream: "geo-db", Outcome: outcomeUpstreamLeftOut},
		{Setting: "Upstreams.DestinationPeer", Value: "other", Upstream: "billing", Outcome: outcomeUpstreamLeftOut},
		{Setting: "Upstreams.LocalBindSocketPath", Value: "/tmp/cache.sock", Upstream: "cache", Outcome: outcomeUpstreamLeftOut},
		{Setting: "Upstreams.MeshGateway.Mode", Value: "remote", Upstream: "search", Outcome: outcomeDirect},
	}
	if !reflect.DeepEqual(c.Refused, want) {
		t.Fatalf("refused\n%+v\nwant\n%+v", c.Refused, want)
	}
}

func TestReadRegistrationAcceptsDefaults(t *testing.T) {
	svc := refusedRegistration()
	p := svc.Proxy
	p.Mode = api.ProxyModeDirect
	p.TransparentProxy = &api.TransparentProxyConfig{} // as Consul may return it for any proxy
	p.MeshGateway.Mode = api.MeshGatewayModeNone
	p.Upstreams = []api.Upstream{{DestinationName: "api", LocalBindPort: 9191, DestinationType: api.UpstreamDestTypeService}}
	c, err := readRegistration(svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Refused) != 0 || len(c.Upstreams) != 1 {
		t.Fatalf("defaults refused: %+v", c.Refused)
	}
	// What makes rendering impossible still rejects the registration.
	p.Upstreams[0].Config = map[string]any{"protocol": "udp"}
	if _, err := readRegistration(svc); err == nil {
		t.Fatal("an upstream with an unknown protocol was accepted")
	}
}

func TestRefusalsLoggedOnce(t *testing.T) {
	var buf bytes.Buffer
	l := newRefusalLog(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info}), "web-sidecar-proxy")
	for i := 0; i < 3; i++ { // the registration watch reads it on every change
		if _, err := l.read(refusedRegistration()); err != nil {
			t.Fatal(err)
		}
	}
	out := buf.String()
	for _, setting := range []string{"Proxy.Mode", "Proxy.TransparentProxy.OutboundListenerPort", "Proxy.TransparentProxy.DialedDirectly",
		"Proxy.MeshGateway.Mode", "Upstreams.DestinationType", "Upstreams.DestinationPeer", "Upstreams.LocalBindSocketPath", "Upstreams.MeshGateway.Mode"} {
		if n := strings.Count(out, "refused (not supported): "+setting+":"); n != 1 {
			t.Errorf("%s logged %d times, want once:\n%s", setting, n, out)
		}
	}
	if n := strings.Count(out, "[ERROR]"); n != 3 {
		t.Errorf("%d error lines, want 3 (one per upstream left out):\n%s", n, out)
	}
	// A new value is news.
	svc := refusedRegistration()
	svc.Proxy.MeshGateway.Mode = api.MeshGatewayModeRemote
	if _, err := l.read(svc); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(buf.String(), "refused (not supported): Proxy.MeshGateway.Mode:"); n != 2 {
		t.Errorf("a changed mesh gateway mode was logged %d times in all, want 2", n)
	}
}

// The registration fields beyond the listener and the upstreams: access
// logs on (from proxy-defaults, as the agent merges them into the
// registration it answers) are served; what cannot be is refused by name.
func TestReadRegistrationProxyFields(t *testing.T) {
	c := harness.StartConsul(t)
	entry := &api.ProxyConfigEntry{Kind: api.ProxyDefaults, Name: api.ProxyConfigGlobal,
		AccessLogs: &api.AccessLogsConfig{Enabled: true, Type: api.FileLogSinkType, Path: "/var/log/envoy.log"}}
	if _, _, err := c.Client.ConfigEntries().Set(entry, nil); err != nil {
		t.Fatal(err)
	}
	err := c.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "web-sidecar-proxy", Name: "web-sidecar-proxy", Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServicePort: 8080, LocalServiceSocketPath: "/run/web.sock",
			Upstreams: []api.Upstream{
				{DestinationName: "api", LocalBindPort: 9191},
				{DestinationName: "ledger", DestinationNamespace: "finance", LocalBindPort: 9192},
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	svc, _, err := c.Client.Agent().Service("web-sidecar-proxy", nil)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := readRegistration(svc)
	if err != nil {
		t.Fatal(err)
	}
	if !pc.AccessLogs {
		t.Errorf("proxy-defaults AccessLogs.Enabled not served: %+v", svc.Proxy.AccessLogs)
	}
	got := map[string]string{}
	for _, r := range pc.Refused {
		got[r.Setting] = r.Value
	}
	for setting, value := range map[string]string{
		"Proxy.AccessLogs.Type": "file", "Proxy.AccessLogs.Path": "/var/log/envoy.log",
		"Proxy.LocalServiceSocketPath": "/run/web.sock", "Upstreams.DestinationNamespace": "finance",
	} {
		if got[setting] != value {
			t.Errorf("%s = %q not refused by name (refused: %v)", setting, value, got)
		}
	}
	if len(pc.Upstreams) != 1 || pc.Upstreams[0].Name != "api" {
		t.Errorf("served upstreams %+v, want api only", pc.Upstreams)
	}
}
