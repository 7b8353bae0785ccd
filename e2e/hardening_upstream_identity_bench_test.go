package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
	"github.com/haconnect/haconnect/lua"
)

// BenchmarkUpstreamIdentityCheck measures what checking an upstream's
// SPIFFE ID costs per request, on keep-alive connections through outbound
// listeners of one HAProxy (one thread, pinned alone to CPU 0), in
// alternating rounds of one run:
//
//	none  no identity check (the ceiling)
//	sub   the encoded URI SAN matched anywhere in ssl_s_der (the old check)
//	map   the certificate's serial and issuer looked up in the map that the
//	      Lua DER parse fills on a miss (the rendered configuration's check)
//	lua   the Lua parse on every response (what the map saves)
//	sha   the certificate's SHA-256 looked up instead (the check before),
//	      repeated as map128 is
//	subN, mapN  the same check written N times in a row: one check costs
//	      too little to stand out of the noise of a shared machine, so the
//	      cost of one is also given as (CPU of xN - CPU of none) / N
//
// The upstream is another HAProxy terminating mTLS and answering 200, on
// CPU 1 with the load generator. It reports req/s, HAProxy CPU per request,
// the ratios to none and of map to sub, and each check's CPU.
func BenchmarkUpstreamIdentityCheck(b *testing.B) {
	ca := harness.NewForeignCA(b)
	td := "11111111-2222-3333-4444-555555555555.consul"
	apiURI := "spiffe://" + td + "/ns/default/dc/dc1/svc/api"
	dir := harness.TempDir(b)
	up := ca.Issue(b, apiURI)
	web := ca.Issue(b, "spiffe://"+td+"/ns/default/dc/dc1/svc/web")
	upPEM := harness.WriteFile(b, dir, "up.pem", up.CertPEM+up.KeyPEM)
	webPEM := harness.WriteFile(b, dir, "web.pem", web.CertPEM+web.KeyPEM)
	caPEM := harness.WriteFile(b, dir, "ca.pem", ca.CertPEM)
	luaFile := harness.WriteFile(b, dir, "haconnect.lua", string(lua.Telemetry))
	peerMap := harness.WriteFile(b, dir, "upstream_peers.map", "")

	upAddr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
	upstream := harness.StartHAProxy(b, harness.TempDir(b), fmt.Sprintf(`global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend api
    bind %s ssl crt %s ca-file %s verify required
    http-request return status 200 content-type text/plain string ok
`, upAddr, upPEM, caPEM), upAddr)
	if err := loadgen.Pin(upstream.Proc.Cmd.Process.Pid, 1); err != nil {
		b.Fatal(err)
	}

	// The rules of each backend, as plugin/render/haproxy.cfg.tmpl writes
	// them (sub: as it wrote them before).
	pattern := fmt.Sprintf("%X", append([]byte{0x86, byte(len(apiURI))}, apiURI...))
	sub := "    http-response deny deny_status 502 unless { ssl_s_der,hex -m sub " + pattern + " }\n"
	// map: keyed by the certificate's serial and issuer (today's); sha:
	// keyed by its SHA-256 (before), whose map the Lua fill does not
	// match, so each line pair does its own hash and a native miss.
	mapCheck := fmt.Sprintf(`    http-response unset-var(txn.hc_peer)
    http-response set-var(txn.hc_idn) ssl_s_i_dn
    http-response set-var(txn.hc_peer) ssl_s_serial,hex,concat(|,txn.hc_idn),map(%[1]s)
    http-response set-var(txn.hc_peer) lua.haconnect_peer_uri(%[1]s,%[2]s) unless { var(txn.hc_peer) -m found }
    http-response deny deny_status 502 unless { var(txn.hc_peer) -m str %[2]s }
`, peerMap, apiURI)
	shaCheck := fmt.Sprintf(`    http-response unset-var(txn.hc_sha)
    http-response set-var(txn.hc_sha) ssl_s_der,sha2(256),hex,map(%[1]s,%[2]s)
    http-response deny deny_status 502 unless { var(txn.hc_sha) -m str %[2]s }
`, peerMap, apiURI)
	const n = 128
	checks := []struct{ name, rules string }{
		{"none", ""}, {"sub", sub}, {"map", mapCheck},
		{fmt.Sprint("sub", n), strings.Repeat(sub, n)}, {fmt.Sprint("map", n), strings.Repeat(mapCheck, n)},
		{"lua", fmt.Sprintf("    http-response deny deny_status 502 unless { lua.haconnect_peer_uri(%[1]s,%[2]s) -m str %[2]s }\n", peerMap, apiURI)},
		{fmt.Sprint("sha", n), strings.Repeat(shaCheck, n)},
	}
	cfg := fmt.Sprintf(`global
    nbthread 1
    log stderr format short local0 notice
    lua-load-per-thread %s
defaults
    mode http
    timeout connect 5s
    timeout client 1m
    timeout server 1m
`, luaFile)
	var scenarios []*scenario
	var addrs []string
	for _, c := range checks {
		addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))
		addrs = append(addrs, addr)
		cfg += fmt.Sprintf(`frontend out_%[1]s
    bind %[2]s
    default_backend up_%[1]s
backend up_%[1]s
%[3]s    server s1 %[4]s ssl crt %[5]s ca-file %[6]s verify required
`, c.name, addr, c.rules, upAddr, webPEM, caPEM)
		scenarios = append(scenarios, &scenario{name: c.name, addr: addr})
	}
	plane := harness.StartHAProxy(b, dir, cfg, addrs...)
	for _, sc := range scenarios {
		sc.pids = []int{plane.Proc.Cmd.Process.Pid}
	}
	measure(b, scenarios)
	reportRatios(b, scenarios, scenarios[0])
	b.ReportMetric(median(scenarios[2].rps)/median(scenarios[1].rps), "map/sub-req/s")
	b.ReportMetric(median(scenarios[1].cpu)/median(scenarios[2].cpu), "map/sub-cpu")
	none := median(scenarios[0].cpu)
	b.ReportMetric((median(scenarios[3].cpu)-none)/n, "sub-check-cpu-us")
	b.ReportMetric((median(scenarios[4].cpu)-none)/n, "map-check-cpu-us")
	b.ReportMetric(median(scenarios[5].cpu)-none, "lua-check-cpu-us")
	b.ReportMetric((median(scenarios[6].cpu)-none)/n, "sha-check-cpu-us")
}
