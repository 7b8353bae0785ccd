package render

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// limitedModel is model() with every registration setting of this file
// set: upstream limits and passive health check, the inbound's timeouts
// and connection cap, and a second admin address.
func limitedModel(proto string) *Model {
	m := model()
	m.AdminBind, m.AdminBindAlso = "127.0.0.1:19000", "127.0.0.1:19001"
	m.Inbound.Protocol = proto
	m.Inbound.HandshakeTimeoutMS, m.Inbound.LocalIdleTimeoutMS, m.Inbound.MaxConnections = 7000, 90000, 500
	u := &m.Upstreams[0]
	u.Protocol, u.ConnectTimeoutMS = proto, 1500
	u.Limits = &Limits{Concurrent: 5, LimitPending: true, MaxPending: 3}
	u.PassiveHealth = &PassiveHealth{MaxFailures: 4, EjectSeconds: 30, MaxEjectionPercent: 10}
	u.Servers[0].MaxConn = 5
	return m
}

// checkConfig has the real HAProxy validate m's configuration.
func checkConfig(t *testing.T, m *Model) string {
	t.Helper()
	dir := harness.TempDir(t)
	writeTestFiles(t, dir)
	m.LeafFile, m.RootsFile = filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	m.SPOEFile, m.AdminSocket = filepath.Join(dir, "spoe.conf"), filepath.Join(dir, "admin.sock")
	m.LuaFile, m.PeerMapFile = filepath.Join(dir, "haconnect.lua"), filepath.Join(dir, "upstream_peers.map")
	m.LatencyMapFile = harness.WriteFile(t, dir, "latency_buckets.map", m.LatencyMapText())
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
	cfg := harness.WriteFile(t, dir, "haproxy.cfg", out.Config)
	if b, err := exec.Command(harness.HAProxyBinary(t), "-c", "-f", cfg).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s\n%s", err, b, out.Config)
	}
	return out.Config
}

func TestRegistrationSettingsRenderAndPassHAProxyCheck(t *testing.T) {
	for _, proto := range []string{ProtocolHTTP, ProtocolTCP} {
		cfg := checkConfig(t, limitedModel(proto))
		want := []string{
			// inbound
			"\n    maxconn 500\n", "\n    timeout client 7000ms\n", "\n    timeout tunnel 90000ms\n",
			// admin listener on both addresses
			"\n    bind 127.0.0.1:19000\n    bind 127.0.0.1:19001\n",
			// limits
			"{ queue(upstream_api) ge 3 }", "\n    timeout queue 1500ms\n", "server s1 10.0.0.1:21000 maxconn 5\n",
			// passive health check
			"fall 2 rise 30",
		}
		if proto == ProtocolHTTP {
			want = append(want, "http-request return status 503", "verify required check inter 1s fall 2 rise 30\n",
				"retry-on conn-failure empty-response response-timeout 500 502 503 504\n")
		} else {
			want = append(want, "tcp-request content reject if { queue(upstream_api) ge 3 }",
				"rise 30 observe layer4 error-limit 4 on-error mark-down\n")
		}
		for _, w := range want {
			if !strings.Contains(cfg, w) {
				t.Errorf("%s: %q not rendered", proto, w)
			}
		}
	}

	// Without the settings, none of it is rendered.
	plain, err := Render(model())
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"maxconn", "timeout client 7", "timeout tunnel", "timeout queue", "queue(", "observe", " 500 502"} {
		if strings.Contains(plain.Config, w) {
			t.Errorf("%q rendered without the setting", w)
		}
	}
}

// A slot's share of the limit changes with the number of instances, as
// addresses do: through the runtime API, so it is not part of the shape;
// the limits themselves are.
func TestLimitShareIsNotPartOfTheShape(t *testing.T) {
	a, err := Render(limitedModel(ProtocolHTTP))
	if err != nil {
		t.Fatal(err)
	}
	m := limitedModel(ProtocolHTTP)
	m.Upstreams[0].Servers[0].MaxConn = 3
	m.Upstreams[0].Servers[1] = Server{Name: "s2", Addr: "10.0.0.2", Port: 21000, MaxConn: 2}
	b, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	if a.Shape != b.Shape || a.Config == b.Config {
		t.Fatal("a change of the slots' shares must change the config but not its shape")
	}
	m.Upstreams[0].Limits.MaxPending = 4
	c, _ := Render(m)
	if c.Shape == b.Shape {
		t.Fatal("a change of max_pending_requests must change the shape (a reload)")
	}
}

func TestValidateRefusesNegativeSettings(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Model)
		want string
	}{
		{"handshake timeout", func(m *Model) { m.Inbound.HandshakeTimeoutMS = -1 }, "handshake timeout -1"},
		{"max inbound connections", func(m *Model) { m.Inbound.MaxConnections = -5 }, "max inbound connections -5"},
		{"limits", func(m *Model) { m.Upstreams[0].Limits.MaxPending = -1 }, "limits"},
		{"passive health", func(m *Model) { m.Upstreams[0].PassiveHealth.MaxFailures = 0 }, "passive health check"},
		{"slot share", func(m *Model) { m.Upstreams[0].Servers[0].MaxConn = -1 }, "maxconn -1"},
		{"second admin bind alone", func(m *Model) { m.AdminBind = "" }, "second admin bind"},
		{"second admin bind a host name", func(m *Model) { m.AdminBindAlso = "metrics.local:9102" }, "not an IP address"},
	} {
		m := limitedModel(ProtocolHTTP)
		tc.edit(m)
		err := m.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
