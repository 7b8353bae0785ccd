package sidecar

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// settingsRegistration is a proxy registration with the Proxy.Config and
// upstream Config keys of settings.go, as Consul's agent returns them
// (JSON numbers are float64).
func settingsRegistration(proxyCfg, upstreamCfg map[string]any) *api.AgentService {
	return &api.AgentService{
		ID: "web-sidecar-proxy", Kind: api.ServiceKindConnectProxy, Port: 21000,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web", LocalServicePort: 8080, Config: proxyCfg,
			Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: 9191, Config: upstreamCfg}},
		},
	}
}

func TestReadRegistrationHonoursProxySettings(t *testing.T) {
	c, err := readRegistration(settingsRegistration(map[string]any{
		"protocol": "http", "local_connect_timeout_ms": float64(1500), "local_request_timeout_ms": "2500",
		"local_idle_timeout_ms": float64(90000), "handshake_timeout_ms": float64(7000), "max_inbound_connections": float64(300),
		"envoy_prometheus_bind_addr": "0.0.0.0:9102", "envoy_stats_bind_addr": "127.0.0.1:9103",
	}, nil))
	if err != nil {
		t.Fatal(err)
	}
	got := []int{c.LocalConnectTimeoutMS, c.LocalRequestTimeoutMS, c.LocalIdleTimeoutMS, c.HandshakeTimeoutMS, c.MaxConnections}
	if want := []int{1500, 2500, 90000, 7000, 300}; !reflect.DeepEqual(got, want) {
		t.Errorf("timeouts and cap %v, want %v", got, want)
	}
	if want := []string{"0.0.0.0:9102", "127.0.0.1:9103"}; !reflect.DeepEqual(c.MetricsBinds, want) {
		t.Errorf("metrics binds %v, want %v", c.MetricsBinds, want)
	}
	if len(c.Refused) != 0 {
		t.Errorf("honoured settings refused: %+v", c.Refused)
	}

	// The same address twice is one listener address; the flag wins.
	c, _ = readRegistration(settingsRegistration(map[string]any{
		"envoy_prometheus_bind_addr": "127.0.0.1:9102", "envoy_stats_bind_addr": "127.0.0.1:9102"}, nil))
	if !reflect.DeepEqual(c.MetricsBinds, []string{"127.0.0.1:9102"}) {
		t.Errorf("metrics binds %v, want one", c.MetricsBinds)
	}
	if a, b := adminBinds("127.0.0.1:19000", []string{"0.0.0.0:9102", "0.0.0.0:9103"}); a != "127.0.0.1:19000" || b != "" {
		t.Errorf("-admin-bind must take precedence: %q %q", a, b)
	}
	if a, b := adminBinds("", []string{"0.0.0.0:9102", "0.0.0.0:9103"}); a != "0.0.0.0:9102" || b != "0.0.0.0:9103" {
		t.Errorf("registration binds: %q %q", a, b)
	}
}

func TestReadRegistrationRefusesMetricsHostNamesAndUnknownEnvoyKeys(t *testing.T) {
	c, err := readRegistration(settingsRegistration(map[string]any{
		"envoy_prometheus_bind_addr": "metrics.service.consul:9102",
		"envoy_stats_bind_addr":      "127.0.0.1:9103",
		"envoy_tracing_json":         `{"http":{"name":"envoy.tracers.zipkin"}}`,
		"envoy_made_up_setting":      true,
		"some_app_key":               "x", // not Envoy's: Envoy ignores it too
	}, map[string]any{"envoy_cluster_json": "{}", "envoy_another_one": float64(1)}))
	if err != nil {
		t.Fatalf("refused keys must not reject the registration: %v", err)
	}
	if !reflect.DeepEqual(c.MetricsBinds, []string{"127.0.0.1:9103"}) {
		t.Errorf("metrics binds %v, want the IP one only", c.MetricsBinds)
	}
	var got []string
	for _, r := range c.Refused {
		got = append(got, r.Setting+"|"+r.Upstream)
		if r.Setting == "Proxy.Config.envoy_prometheus_bind_addr" && !strings.Contains(r.Outcome, "host name") {
			t.Errorf("host name refusal does not say why: %q", r.Outcome)
		}
	}
	want := []string{"Proxy.Config.envoy_prometheus_bind_addr|", "Proxy.Config.envoy_made_up_setting|", "Proxy.Config.envoy_tracing_json|",
		"Upstreams.Config.envoy_another_one|api", "Upstreams.Config.envoy_cluster_json|api"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("refused %v, want %v", got, want)
	}
}

func TestReadRegistrationReadsUpstreamLimitsAndPassiveHealth(t *testing.T) {
	c, err := readRegistration(settingsRegistration(map[string]any{"protocol": "http"}, map[string]any{
		"connect_timeout_ms": float64(2000),
		"limits":             map[string]any{"max_connections": float64(10), "max_concurrent_requests": float64(4), "max_pending_requests": float64(0)},
		// an HCL service definition gives a block as a one-map list
		"passive_health_check": []any{map[string]any{"interval": "5s", "max_failures": float64(3), "base_ejection_time": "10s",
			"enforcing_consecutive_5xx": float64(100)}},
	}))
	if err != nil {
		t.Fatal(err)
	}
	u := c.Upstreams[0]
	if u.ConnectTimeoutMS != 2000 {
		t.Errorf("connect timeout %d", u.ConnectTimeoutMS)
	}
	if want := (render.Limits{Concurrent: 4, LimitPending: true, MaxPending: 0}); u.Limits == nil || *u.Limits != want {
		t.Errorf("limits %+v, want %+v", u.Limits, want)
	}
	if want := (render.PassiveHealth{MaxFailures: 3, EjectSeconds: 10, MaxEjectionPercent: 10}); u.PassiveHealth == nil || *u.PassiveHealth != want {
		t.Errorf("passive health %+v, want %+v", u.PassiveHealth, want)
	}

	// Envoy's defaults for what a block leaves out; enforcing 0 ejects
	// nothing; enforcing 1-99 is logged, and so is max_ejection_percent
	// on a tcp upstream (the default protocol here).
	c, err = readRegistration(settingsRegistration(nil, map[string]any{
		"limits":               map[string]any{"max_connections": float64(2)},
		"passive_health_check": map[string]any{"enforcing_consecutive_5xx": float64(50), "max_ejection_percent": float64(10)},
	}))
	if err != nil {
		t.Fatal(err)
	}
	u = c.Upstreams[0]
	if want := (render.Limits{Concurrent: 2, LimitPending: true, MaxPending: 1024}); *u.Limits != want {
		t.Errorf("limits %+v, want %+v", *u.Limits, want)
	}
	if want := (render.PassiveHealth{MaxFailures: 5, EjectSeconds: 30, MaxEjectionPercent: 10}); *u.PassiveHealth != want {
		t.Errorf("passive health %+v, want %+v", *u.PassiveHealth, want)
	}
	if len(c.Refused) != 2 {
		t.Errorf("refused %+v, want enforcing_consecutive_5xx and max_ejection_percent (tcp)", c.Refused)
	}
	c, _ = readRegistration(settingsRegistration(nil, map[string]any{"passive_health_check": map[string]any{"enforcing_consecutive_5xx": float64(0)}}))
	if c.Upstreams[0].PassiveHealth != nil {
		t.Error("enforcing_consecutive_5xx 0 must eject nothing")
	}
}

// Invalid values reject the registration with an error naming the field;
// the sidecar then keeps its running configuration (sidecar.go logs it
// and counts it, the apply loop renders nothing from it).
func TestReadRegistrationRejectsInvalidSettings(t *testing.T) {
	for _, tc := range []struct {
		proxy, upstream map[string]any
		want            string
	}{
		{map[string]any{"handshake_timeout_ms": float64(-1)}, nil, "handshake_timeout_ms: -1 is negative"},
		{map[string]any{"max_inbound_connections": "many"}, nil, `max_inbound_connections: "many" is not an integer`},
		{map[string]any{"local_idle_timeout_ms": 1.5}, nil, "local_idle_timeout_ms: 1.5 is not an integer"},
		{nil, map[string]any{"connect_timeout_ms": float64(-5)}, "connect_timeout_ms: -5 is negative"},
		{nil, map[string]any{"limits": "10"}, "limits: 10 (string) is not a block"},
		{nil, map[string]any{"limits": map[string]any{"max_connections": float64(-1)}}, "limits.max_connections: -1 is negative"},
		{nil, map[string]any{"limits": map[string]any{"max_pending_requests": true}}, "limits.max_pending_requests: true (bool) is not an integer"},
		{nil, map[string]any{"limits": map[string]any{"max_connections": float64(0)}}, "limit of 0"},
		{nil, map[string]any{"passive_health_check": map[string]any{"interval": "soon"}}, `passive_health_check.interval: "soon" is not a duration`},
		{nil, map[string]any{"passive_health_check": map[string]any{"max_failures": float64(-2)}}, "passive_health_check.max_failures: -2 is negative"},
		{nil, map[string]any{"passive_health_check": map[string]any{"enforcing_consecutive_5xx": float64(150)}}, "not a percentage"},
	} {
		_, err := readRegistration(settingsRegistration(tc.proxy, tc.upstream))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %v: got %v, want an error containing %q", tc.proxy, tc.upstream, err, tc.want)
		}
	}
}

func TestUnknownEnvoyKeyLoggedOnceByName(t *testing.T) {
	var buf bytes.Buffer
	l := newRefusalLog(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info}), "web-sidecar-proxy")
	for i := 0; i < 3; i++ {
		if _, err := l.read(settingsRegistration(map[string]any{"envoy_made_up_setting": "1"}, nil)); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(buf.String(), "refused (not supported): Proxy.Config.envoy_made_up_setting:"); n != 1 {
		t.Errorf("logged %d times, want once:\n%s", n, buf.String())
	}
}

// Nomad writes envoy_stats_tags on every sidecar (injectNomadInfo): it
// changes no traffic, so it is said once at Info, never warned about.
func TestNotApplicableKeyIsInfoOnce(t *testing.T) {
	var buf bytes.Buffer
	l := newRefusalLog(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info}), "web-sidecar-proxy")
	tags := map[string]any{"envoy_stats_tags": []any{"nomad.alloc_id=1", "nomad.group=api"}}
	for i := 0; i < 3; i++ {
		if _, err := l.read(settingsRegistration(tags, nil)); err != nil {
			t.Fatal(err)
		}
	}
	out := buf.String()
	if n := strings.Count(out, "[INFO]  registration setting not applicable: Proxy.Config.envoy_stats_tags:"); n != 1 {
		t.Errorf("logged %d times at Info, want once:\n%s", n, out)
	}
	if strings.Contains(out, "[WARN]") {
		t.Errorf("a not applicable key is warned about:\n%s", out)
	}
}

func TestLimitShares(t *testing.T) {
	srv := func(addrs ...string) []render.Server {
		var s []render.Server
		for i, a := range addrs {
			s = append(s, render.Server{Name: render.ServerName(i), Addr: a, Port: 1})
		}
		return s
	}
	shares := func(s []render.Server) []int {
		var n []int
		for _, x := range s {
			n = append(n, x.MaxConn)
		}
		return n
	}
	for _, tc := range []struct {
		limit int
		addrs []string
		want  []int
	}{
		{10, []string{"a", "", "b", "c"}, []int{4, 0, 3, 3}}, // 10 in all
		{2, []string{"a", "b", "c", ""}, []int{1, 1, 1, 0}},  // at least one each
		{5, []string{"", "", "", ""}, []int{0, 0, 0, 0}},
	} {
		s := srv(tc.addrs...)
		limitShares(tc.limit, s)
		if got := shares(s); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("limit %d over %v: %v, want %v", tc.limit, tc.addrs, got, tc.want)
		}
	}
}

// An instance joining changes every slot's share through the runtime API;
// a slot whose instance stays gets only its new maxconn (a "health up"
// would undo a passive health check's verdict).
func TestPlanSetsLimitSharesThroughTheRuntimeAPI(t *testing.T) {
	s := testSidecar(t, nil)
	limited := func(ports ...int) snapshot {
		snap := testSnapshot("LEAF", "ROOT", ports...)
		snap.reg.Upstreams[0].Limits = &render.Limits{Concurrent: 4}
		return snap
	}
	prev := stateOf(t, s, limited(1), nil)
	if got := prev.model.Upstreams[0].Servers[0].MaxConn; got != 4 {
		t.Fatalf("one instance's share %d, want 4", got)
	}
	next := stateOf(t, s, limited(1, 2), prev.slots)
	p := planApply(true, prev, next)
	want := []haproxy.Command{
		haproxy.SetServerMaxconn("upstream_api", "s1", 2),
		haproxy.SetServerMaxconn("upstream_api", "s2", 2),
		haproxy.SetServerAddr("upstream_api", "s2", "10.0.0.1", 2),
		haproxy.SetServerState("upstream_api", "s2", haproxy.ServerReady),
		haproxy.SetServerHealth("upstream_api", "s2", haproxy.HealthUp),
	}
	if p.method != methodRuntime || !reflect.DeepEqual(p.runtime, want) {
		t.Fatalf("plan %s %v, want runtime %v", p.method, p.runtime, want)
	}
}

func TestAdminBindOverrideLoggedOnce(t *testing.T) {
	var buf bytes.Buffer
	s, err := New(Config{ProxyID: "web-sidecar-proxy", Dir: t.TempDir(), AdminBind: "127.0.0.1:19000",
		Logger: hclog.New(&hclog.LoggerOptions{Output: &buf})})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		s.logAdminOverride([]string{"0.0.0.0:9102"})
	}
	s.logAdminOverride(nil)
	s.logAdminOverride([]string{"0.0.0.0:9103"})
	if n := strings.Count(buf.String(), "-admin-bind takes precedence"); n != 2 {
		t.Errorf("logged %d times, want 2 (once per distinct address):\n%s", n, buf.String())
	}
}
