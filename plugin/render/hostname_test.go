package render

import (
	"strings"
	"testing"
)

// The model holds IP addresses only: host names are resolved before it is
// built (plugin/sidecar/resolve.go), so that neither `haproxy -c` nor a
// reload ever depends on DNS, and a name that does not resolve costs one
// server, not the render.
func TestValidateRefusesHostNames(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Model)
		want string
	}{
		{"instance", func(m *Model) { m.Upstreams[0].Servers[0].Addr = "api.service.consul" }, "upstream api instance address \"api.service.consul\" is not an IP address"},
		{"local app", func(m *Model) { m.Inbound.LocalAddr = "app" }, "local service address \"app\" is not an IP address"},
		{"inbound bind", func(m *Model) { m.Inbound.BindAddr = "web.local" }, "inbound bind address \"web.local\" is not an IP address"},
		{"upstream bind", func(m *Model) { m.Upstreams[0].BindAddr = "localhost" }, "upstream api bind address \"localhost\" is not an IP address"},
	} {
		m := model()
		tc.edit(m)
		if _, err := Render(m); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one saying %q", tc.name, err, tc.want)
		}
	}
	// IPv6 instances are addresses too.
	m := model()
	m.Upstreams[0].Servers[0].Addr = "fd00::1"
	out, err := Render(m)
	if err != nil || !strings.Contains(out.Config, "server s1 fd00::1:21000") {
		t.Fatalf("an IPv6 instance: %v", err)
	}
}
