package sidecar

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/haconnect/haconnect/plugin/render"
)

// setting is one key of a registration's Proxy.Config or of an upstream's
// Config: what Envoy (configured by Consul) does with it, and what
// haconnect does. settings is the list the README's table is made from;
// readProxySettings and readUpstreamSettings follow it: an honoured key is
// read (a wrong type or a negative number rejects the registration, which
// keeps the running configuration, logged and counted); a refused key, and
// any envoy_* key not listed, is logged once by name and not applied. A
// key that changes nothing a user could miss (Envoy's thread balancing,
// xDS timing, metric tags and flushing) is "not applicable": logged once
// at Info, not warned about, since Nomad writes envoy_stats_tags on every
// sidecar. A feature not provided (tracing, pushed metrics) is refused.
type setting struct {
	Key      string
	Upstream bool // an upstream's Config key; false: Proxy.Config
	Honoured bool
	Envoy    string // what Envoy does with it
	Here     string // what haconnect does instead, or why it is refused
}

// notApplicable reports whether the key, not honoured, changes no traffic.
func (s setting) notApplicable() bool { return strings.HasPrefix(s.Here, "not applicable: ") }

var settings = []setting{
	// Proxy.Config
	{"bind_address", false, true, "public listener address", "the inbound listener's address (an IP; a host name is refused)"},
	{"bind_port", false, true, "public listener port", "the inbound listener's port"},
	{"protocol", false, true, "tcp, http, http2, grpc", "tcp: mode tcp; http: mode http; http2 and grpc: mode http with h2 on every hop (ALPN h2 between sidecars, h2c to and from the app)"},
	{"local_connect_timeout_ms", false, true, "local app cluster connect_timeout (5s)", "local_app timeout connect (5s)"},
	{"local_request_timeout_ms", false, true, "local app route timeout: whole response (15s)", "local_app timeout server (30s): inactivity, HAProxy has no whole-response timeout"},
	{"local_idle_timeout_ms", false, true, "local app route idle_timeout: stream idle (5m)", "local_app timeout tunnel: an idle TCP or upgraded stream (1m)"},
	{"handshake_timeout_ms", false, true, "not read by Envoy (Consul's built-in proxy: inbound TLS handshake, 10s)", "public_listener timeout client: HAProxy 2.6 bounds the handshake by it (no timeout client-hs before 2.8); it then also bounds a caller's silence inside a request"},
	{"max_inbound_connections", false, true, "public listener connection limit: excess connections closed", "public_listener maxconn: excess connections wait in the kernel's accept queue"},
	{"rate_limits", false, true, "not read by Envoy (Consul Enterprise 1.17+ has service-defaults RateLimits, per instance and per route; Consul 1.16 refuses the key)", "stick tables: budgets per calling service (per_source, \"*\" for the rest), per instance, per route (path_exact, path_prefix, path_regex on the normalized path, the first match), connections_per_second per caller (tcp too); B requests in any window of B/R seconds; 429 or gRPC RESOURCE_EXHAUSTED; numbers changed at runtime"},
	{"envoy_prometheus_bind_addr", false, true, "a listener serving /metrics", "the admin listener (/metrics, /metrics/haproxy, /stats) there; -admin-bind takes precedence"},
	{"envoy_stats_bind_addr", false, true, "a listener serving /stats", "the same admin listener, on this address too (a second bind line when it differs)"},
	{"balance_inbound_connections", false, false, "exact_balance of connections over Envoy's worker threads", "not applicable: HAProxy spreads accepted connections over its threads itself"},
	{"max_request_headers_kb", false, false, "largest request headers accepted", "refused: HAProxy's limit is tune.bufsize for the whole process"},
	{"xds_fetch_timeout_ms", false, false, "wait for xDS resources", "not applicable: there is no xDS"},
	{"envoy_public_listener_json", false, false, "replaces the public listener", "refused: the inbound listener is haconnect's (mTLS and intentions)"},
	{"envoy_local_cluster_json", false, false, "replaces the local app cluster", "refused: local_app is haconnect's"},
	{"envoy_listener_tracing_json", false, false, "tracing on the public listener", "refused: traceparent is propagated, no spans are sent"},
	{"envoy_tracing_json", false, false, "the tracer (bootstrap)", "refused: no tracer"},
	{"envoy_extra_static_clusters_json", false, false, "extra clusters (bootstrap)", "refused: no Envoy clusters"},
	{"envoy_extra_static_listeners_json", false, false, "extra listeners (bootstrap)", "refused: no Envoy listeners"},
	{"envoy_bootstrap_json_tpl", false, false, "replaces the bootstrap", "refused: no bootstrap"},
	{"envoy_statsd_url", false, false, "statsd sink", "refused: metrics are pulled (Prometheus) from the admin listener"},
	{"envoy_dogstatsd_url", false, false, "dogstatsd sink", "refused: metrics are pulled from the admin listener"},
	{"envoy_extra_stats_sinks_json", false, false, "extra stats sinks", "refused: metrics are pulled from the admin listener"},
	{"envoy_stats_config_json", false, false, "stats configuration", "refused: HAProxy's exporter names its own metrics"},
	{"envoy_stats_tags", false, false, "tags on every metric", "not applicable: HAProxy's exporter labels by proxy and server"},
	{"envoy_stats_flush_interval", false, false, "push interval of the sinks", "not applicable: nothing is pushed"},
	{"envoy_telemetry_collector_bind_socket_dir", false, false, "Consul telemetry collector", "refused: no collector"},
	// Upstreams[].Config
	{"protocol", true, true, "tcp, http, http2, grpc", "as the proxy's protocol, for this upstream's listener and backend"},
	{"connect_timeout_ms", true, true, "cluster connect_timeout (5s)", "backend timeout connect (5s), also the most a stream waits in the limits' queue"},
	{"limits", true, true, "circuit breakers of the upstream cluster (1024 each by default)", "max_connections and max_concurrent_requests (the smaller; tcp: max_connections) split over the instances as server maxconn, moved through the runtime API as instances come and go; max_pending_requests checked on the backend's queue, one more is a 503 at once; a queued request waits at most connect_timeout_ms; no limit without the key"},
	{"passive_health_check", true, true, "outlier detection: eject after consecutive 5xx for base_ejection_time; Consul enables it with Envoy's defaults even without the key", "http: the sidecar counts an instance's 5xx and retried answers each second and marks it down at max_failures (at most max_ejection_percent of the instances), back after base_ejection_time passing checks; idempotent requests retried on 500/502/503/504 meanwhile; tcp: observe layer4 error-limit on-error mark-down; only with the key"},
	{"envoy_listener_json", true, false, "replaces the upstream's listener", "refused: the upstream's listener is haconnect's"},
	{"envoy_cluster_json", true, false, "replaces the upstream's cluster", "refused: the upstream's backend is haconnect's (mTLS, identity check)"},
	{"balance_outbound_connections", true, false, "exact_balance over Envoy's worker threads", "not applicable: HAProxy spreads connections over its threads itself"},
}

// envoyDefaultLimit is Envoy's default for each circuit breaker Consul
// leaves unset: a limits block that sets one keeps the others at it.
const envoyDefaultLimit = 1024

// refusedKeys reports the keys of cfg that settings refuses, and any
// envoy_* key it does not know, as refusals of upstream ("" the proxy's).
func refusedKeys(cfg map[string]any, upstream string) []refusal {
	known := map[string]setting{}
	for _, s := range settings {
		if s.Upstream == (upstream != "") {
			known[s.Key] = s
		}
	}
	prefix := "Proxy.Config."
	if upstream != "" {
		prefix = "Upstreams.Config."
	}
	var out []refusal
	for _, k := range sortedKeys(cfg) {
		s, ok := known[k]
		switch {
		case ok && s.Honoured:
			continue
		case ok && s.notApplicable():
			out = append(out, refusal{Setting: prefix + k, Value: shortValue(cfg[k]), Upstream: upstream, Outcome: s.Here})
		case ok:
			out = append(out, refusal{Setting: prefix + k, Value: shortValue(cfg[k]), Upstream: upstream, Outcome: "not applied: " + strings.TrimPrefix(s.Here, "refused: ")})
		case strings.HasPrefix(k, "envoy_"):
			out = append(out, refusal{Setting: prefix + k, Value: shortValue(cfg[k]), Upstream: upstream, Outcome: "not applied: an Envoy setting haconnect does not know"})
		}
	}
	return out
}

// readProxySettings reads the Proxy.Config keys beyond the listener's
// address, port and protocol.
func readProxySettings(c *proxyConfig, cfg map[string]any) error {
	var err error
	for _, o := range []struct {
		key string
		to  *int
	}{
		{"local_connect_timeout_ms", &c.LocalConnectTimeoutMS}, {"local_request_timeout_ms", &c.LocalRequestTimeoutMS},
		{"local_idle_timeout_ms", &c.LocalIdleTimeoutMS}, {"handshake_timeout_ms", &c.HandshakeTimeoutMS},
		{"max_inbound_connections", &c.MaxConnections},
	} {
		if *o.to, err = countOption(cfg, o.key, *o.to); err != nil {
			return fmt.Errorf("Proxy.Config %w", err)
		}
	}
	if c.RateLimits, err = readRateLimits(cfg); err != nil {
		return err
	}
	// The metrics listener: Envoy serves Prometheus on one address and
	// /stats on the other; both go to the one admin listener, on each
	// distinct address. A value that is not <IP>:<port> is refused by name
	// (a listener binds an address; a name is not resolved for it), and
	// the rest of the registration is served.
	for _, key := range []string{"envoy_prometheus_bind_addr", "envoy_stats_bind_addr"} {
		v, ok := cfg[key]
		if !ok || v == nil || v == "" {
			continue
		}
		addr, err := bindAddrOption(v)
		if err != nil {
			c.Refused = append(c.Refused, refusal{Setting: "Proxy.Config." + key, Value: shortValue(v),
				Outcome: "metrics not served there: " + err.Error()})
			continue
		}
		if len(c.MetricsBinds) == 0 || c.MetricsBinds[0] != addr {
			c.MetricsBinds = append(c.MetricsBinds, addr)
		}
	}
	c.Refused = append(c.Refused, refusedKeys(cfg, "")...)
	return nil
}

// bindAddrOption reads "<IP>:<port>".
func bindAddrOption(v any) (string, error) {
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%v (%T) is not a string <IP>:<port>", v, v)
	}
	ap, err := netip.ParseAddrPort(strings.TrimSpace(s))
	if err != nil {
		if i := strings.LastIndex(s, ":"); i > 0 {
			if host := strings.Trim(s[:i], "[]"); !isIP(host) {
				return "", fmt.Errorf("%q is not <IP>:<port>: %q is a host name, and a listener binds an IP address", s, host)
			}
		}
		return "", fmt.Errorf("%q is not <IP>:<port>", s)
	}
	if ap.Port() == 0 {
		return "", fmt.Errorf("%q: port 0", s)
	}
	return ap.String(), nil
}

// adminBinds is where the admin listener is served: -admin-bind when
// given (it takes precedence over the registration), else the
// registration's envoy_prometheus_bind_addr / envoy_stats_bind_addr.
func adminBinds(flag string, fromRegistration []string) (string, string) {
	switch {
	case flag != "":
		return flag, ""
	case len(fromRegistration) == 0:
		return "", ""
	case len(fromRegistration) == 1:
		return fromRegistration[0], ""
	}
	return fromRegistration[0], fromRegistration[1]
}

// logAdminOverride says once (again when they change) that -admin-bind
// serves the metrics instead of the registration's addresses.
func (s *Sidecar) logAdminOverride(fromRegistration []string) {
	addrs := strings.Join(fromRegistration, ",")
	if s.cfg.AdminBind == "" || addrs == "" || addrs == s.adminOverridden {
		return
	}
	s.adminOverridden = addrs
	s.log.Info("-admin-bind takes precedence: the metrics listener is not served at the registration's envoy_prometheus_bind_addr/envoy_stats_bind_addr",
		"admin_bind", s.cfg.AdminBind, "registration", addrs)
}

// readUpstreamSettings reads an upstream's limits and passive health
// check into uc.
func readUpstreamSettings(c *proxyConfig, uc *render.Upstream, cfg map[string]any) error {
	var err error
	if uc.ConnectTimeoutMS, err = countOption(cfg, "connect_timeout_ms", 0); err != nil {
		return err
	}
	if uc.Limits, err = readLimits(c, uc, cfg["limits"]); err != nil {
		return err
	}
	if uc.PassiveHealth, err = readPassiveHealth(c, uc, cfg["passive_health_check"]); err != nil {
		return err
	}
	c.Refused = append(c.Refused, refusedKeys(cfg, uc.Name)...)
	return nil
}

// readLimits maps Envoy's circuit breakers of an upstream cluster:
//   - max_connections (connections to the cluster) and, for HTTP,
//     max_concurrent_requests (requests in flight): HTTP/1.1 to the
//     upstream carries one request per connection, so both bound the
//     same thing here: the streams in flight, the smaller of the two.
//     Envoy counts them for the whole cluster; HAProxy's maxconn is per
//     server, so the limit is split over the filled slots (an instance's
//     share is the limit divided by the instance count, the remainder
//     going to the first ones, at least 1 each: more instances than the
//     limit let one stream per instance through). The shares change
//     through the runtime API as instances come and go.
//   - max_pending_requests: streams waiting for a free share. HAProxy
//     queues them in the backend; one more than the limit is refused at
//     once (HTTP 503, TCP closed), as Envoy's overflow. A queued stream
//     waits at most the connect timeout (HAProxy's timeout queue), then
//     gets a 503; Envoy bounds it by the route timeout (15s) instead.
//
// Unset, a breaker keeps Envoy's default (1024) once the block is given;
// without the block nothing is limited (Envoy: 1024 each).
func readLimits(c *proxyConfig, uc *render.Upstream, v any) (*render.Limits, error) {
	m, err := blockOption("limits", v)
	if m == nil || err != nil {
		return nil, err
	}
	l := &render.Limits{}
	conns, err := countOption(m, "max_connections", -1)
	if err != nil {
		return nil, fmt.Errorf("limits.%w", err)
	}
	reqs, err := countOption(m, "max_concurrent_requests", -1)
	if err != nil {
		return nil, fmt.Errorf("limits.%w", err)
	}
	pending, err := countOption(m, "max_pending_requests", -1)
	if err != nil {
		return nil, fmt.Errorf("limits.%w", err)
	}
	if uc.Protocol == render.ProtocolTCP && reqs >= 0 {
		c.Refused = append(c.Refused, refusal{Setting: "Upstreams.Config.limits.max_concurrent_requests", Value: strconv.Itoa(reqs),
			Upstream: uc.Name, Outcome: "not applied: a tcp upstream has connections, not requests (Envoy ignores it too)"})
		reqs = -1
	}
	l.Concurrent = envoyDefaultLimit
	for _, n := range []int{conns, reqs} {
		if n >= 0 && n < l.Concurrent {
			l.Concurrent = n
		}
	}
	if l.Concurrent == 0 {
		// Envoy lets nothing through; HAProxy's maxconn 0 is "no limit".
		return nil, fmt.Errorf("limits: a limit of 0 would refuse every stream (use at least 1)")
	}
	l.LimitPending, l.MaxPending = true, envoyDefaultLimit
	if pending >= 0 {
		l.MaxPending = pending
	}
	for _, k := range sortedKeys(m) {
		switch k {
		case "max_connections", "max_concurrent_requests", "max_pending_requests":
		default:
			c.Refused = append(c.Refused, refusal{Setting: "Upstreams.Config.limits." + k, Value: shortValue(m[k]),
				Upstream: uc.Name, Outcome: "not applied: not a limit Consul knows"})
		}
	}
	return l, nil
}

// readPassiveHealth maps Envoy's outlier detection (consecutive 5xx):
//   - HTTP: HAProxy 2.6 decides a retry (retry-on) before it observes the
//     answer, so the failures the retries hide from callers never reach
//     observe layer7's error-limit. The sidecar counts them instead
//     (outlier.go): every second it reads each server's retried and 5xx
//     answers and its other answers (show stat); max_failures failures
//     with no other answer in between (across sweeps) take the instance
//     out (set server health down), within a second of the Nth failure
//     where Envoy ejects at once. Envoy counts every 5xx and local
//     connection failures; so does the sidecar (5xx answers, and retries,
//     which are failed connections and 500/502/503/504 answers).
//   - TCP: HAProxy's own observe layer4 error-limit on-error mark-down
//     (failed connections), at once.
//   - The return: Envoy re-adds a host after base_ejection_time (30s,
//     multiplied by the times it was ejected), at the first interval sweep
//     (10s) past that. HAProxy has no sweep and no multiplier: the
//     instance needs base_ejection_time passing health checks in a row
//     (one a second, rise), so it is back about base_ejection_time later
//     if it answers. interval is checked but has no HAProxy counterpart.
//   - enforcing_consecutive_5xx (the % chance of ejecting, 100): 0 turns
//     ejection off (nothing is rendered); 1-99 is served as 100, and
//     logged: this ejects always or never.
//   - max_ejection_percent (10, at least one instance): honoured for HTTP
//     by the sidecar (instances down for any reason count); for TCP
//     HAProxy has no cap: every failing instance is taken out, logged
//     when given.
//
// Retries: an HTTP upstream with the check retries 500, 502, 503 and 504
// answers of idempotent requests on another instance (retry-on,
// redispatch), so the failures that take an instance out do not reach
// callers; Envoy needs a retry policy (service-router) for that.
func readPassiveHealth(c *proxyConfig, uc *render.Upstream, v any) (*render.PassiveHealth, error) {
	m, err := blockOption("passive_health_check", v)
	if m == nil || err != nil {
		return nil, err
	}
	const key = "passive_health_check."
	h := &render.PassiveHealth{}
	if h.MaxFailures, err = countOption(m, "max_failures", 5); err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	// Consul's newer consecutive_5xx overrides max_failures.
	if h.MaxFailures, err = countOption(m, "consecutive_5xx", h.MaxFailures); err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	if h.MaxFailures == 0 {
		h.MaxFailures = 5 // Consul leaves 0 unset: Envoy's default
	}
	if _, err := durationOption(m, "interval", 10*time.Second); err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	eject, err := durationOption(m, "base_ejection_time", 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	h.EjectSeconds = max(1, int((eject+time.Second-1)/time.Second))
	enforcing, err := countOption(m, "enforcing_consecutive_5xx", 100)
	if err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	if h.MaxEjectionPercent, err = countOption(m, "max_ejection_percent", 10); err != nil {
		return nil, fmt.Errorf(key+"%w", err)
	}
	if h.MaxEjectionPercent > 100 {
		return nil, fmt.Errorf(key+"max_ejection_percent: %d is not a percentage", h.MaxEjectionPercent)
	}
	switch {
	case enforcing > 100:
		return nil, fmt.Errorf(key+"enforcing_consecutive_5xx: %d is not a percentage", enforcing)
	case enforcing == 0:
		h = nil // detection without ejection: nothing to do
	case enforcing < 100:
		c.Refused = append(c.Refused, refusal{Setting: "Upstreams.Config." + key + "enforcing_consecutive_5xx", Value: strconv.Itoa(enforcing),
			Upstream: uc.Name, Outcome: "served as 100: HAProxy takes an instance out always or never"})
	}
	for _, k := range sortedKeys(m) {
		switch k {
		case "max_failures", "consecutive_5xx", "interval", "base_ejection_time", "enforcing_consecutive_5xx":
		case "max_ejection_percent":
			if uc.Protocol != render.ProtocolTCP {
				continue
			}
			c.Refused = append(c.Refused, refusal{Setting: "Upstreams.Config." + key + k, Value: shortValue(m[k]),
				Upstream: uc.Name, Outcome: "not applied to a tcp upstream: HAProxy takes every failing instance out"})
		default:
			c.Refused = append(c.Refused, refusal{Setting: "Upstreams.Config." + key + k, Value: shortValue(m[k]),
				Upstream: uc.Name, Outcome: "not applied: only consecutive 5xx are observed"})
		}
	}
	return h, nil
}

// blockOption reads a nested block: a map, or the one-map list an HCL
// service definition gives.
func blockOption(key string, v any) (map[string]any, error) {
	switch b := v.(type) {
	case nil:
		return nil, nil
	case map[string]any:
		return b, nil
	case []any:
		if len(b) == 1 {
			if m, ok := b[0].(map[string]any); ok {
				return m, nil
			}
		}
	}
	return nil, fmt.Errorf("%s: %v (%T) is not a block of settings", key, v, v)
}

// countOption is intOption for a count or a time in milliseconds: a
// negative number is refused, naming the key.
func countOption(cfg map[string]any, key string, def int) (int, error) {
	n, err := intOption(cfg, key, def)
	if err != nil {
		return 0, err
	}
	if _, given := cfg[key]; given && cfg[key] != nil && n < 0 {
		return 0, fmt.Errorf("%s: %d is negative", key, n)
	}
	return n, nil
}

// durationOption reads a duration as Consul decodes one: a string ("10s")
// or a number of nanoseconds.
func durationOption(cfg map[string]any, key string, def time.Duration) (time.Duration, error) {
	v, ok := cfg[key]
	if !ok || v == nil {
		return def, nil
	}
	var d time.Duration
	switch x := v.(type) {
	case string:
		var err error
		if d, err = time.ParseDuration(strings.TrimSpace(x)); err != nil {
			return 0, fmt.Errorf("%s: %q is not a duration", key, x)
		}
	case float64:
		d = time.Duration(x)
	case int:
		d = time.Duration(x)
	default:
		return 0, fmt.Errorf("%s: %v (%T) is not a duration", key, v, v)
	}
	if d < 0 {
		return 0, fmt.Errorf("%s: %s is negative", key, d)
	}
	if d == 0 {
		return def, nil
	}
	return d, nil
}

// shortValue is a setting's value for a log line: escape hatches hold
// whole JSON documents.
func shortValue(v any) string {
	s := fmt.Sprint(v)
	if len(s) > 80 {
		s = s[:77] + "..."
	}
	return s
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// limitShares splits an upstream's concurrency limit over its filled
// slots: each gets limit/filled, the first ones one more for the
// remainder, at least 1 each; a free slot gets 0 (its maxconn is set when
// an instance fills it).
func limitShares(limit int, servers []render.Server) {
	filled := 0
	for _, s := range servers {
		if s.Addr != "" {
			filled++
		}
	}
	i := 0
	for k := range servers {
		servers[k].MaxConn = 0
		if limit <= 0 || servers[k].Addr == "" {
			continue
		}
		share := limit / filled
		if i < limit%filled {
			share++
		}
		servers[k].MaxConn = max(1, share)
		i++
	}
}
