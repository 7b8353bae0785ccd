package sidecar

import (
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"
)

func eps(ports ...int) []endpoint {
	var out []endpoint
	for _, p := range ports {
		out = append(out, endpoint{Addr: "10.0.0.1", Port: p})
	}
	return out
}

func TestAssignSlotsKeepsInstancesInPlace(t *testing.T) {
	s := assignSlots(nil, eps(1, 2))
	if !reflect.DeepEqual(s, []string{"10.0.0.1:1", "10.0.0.1:2", "", ""}) {
		t.Fatalf("first assignment %v", s)
	}
	s = assignSlots(s, eps(2, 3))
	if !reflect.DeepEqual(s, []string{"10.0.0.1:3", "10.0.0.1:2", "", ""}) {
		t.Fatalf("after churn %v: instance 2 must keep its slot", s)
	}
	s = assignSlots(s, eps(1, 2, 3, 4, 5))
	if len(s) != 8 || s[1] != "10.0.0.1:2" || s[0] != "10.0.0.1:3" {
		t.Fatalf("growth %v", s)
	}
	s = assignSlots(s, eps(2))
	if len(s) != 8 {
		t.Fatalf("shrinking must keep the slots (no reload): %v", s)
	}
}

func TestReadRegistration(t *testing.T) {
	svc := &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServicePort: 8080,
			Config: map[string]any{"protocol": "http", "bind_port": float64(25000), "local_connect_timeout_ms": "250"},
			Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: 9191, Config: map[string]any{"protocol": "tcp"}},
				{DestinationName: "db", Datacenter: "dc2", LocalBindPort: 9192}},
		},
	}
	c, err := readRegistration(svc)
	if err != nil {
		t.Fatal(err)
	}
	if c.BindAddr != "0.0.0.0" || c.BindPort != 25000 || c.LocalAddr != "127.0.0.1" || c.Protocol != "http" ||
		c.LocalConnectTimeoutMS != 250 || c.Upstreams[0].Protocol != "tcp" || c.Upstreams[1].Protocol != "http" ||
		c.Upstreams[1].BindAddr != "127.0.0.1" || upstreamKey(c.Upstreams[1]) != "db@dc2" {
		t.Fatalf("read %+v", c)
	}
	svc.Proxy.Config["bind_port"] = "lots"
	if _, err := readRegistration(svc); err == nil {
		t.Fatal("a non-numeric bind_port was accepted")
	}
	svc.Proxy.Config["bind_port"] = float64(25000)
	if _, err := readRegistration(&api.AgentService{ID: "web", Kind: api.ServiceKindTypical}); err == nil {
		t.Fatal("a plain service was accepted as a proxy")
	}
}
