package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/benchreport"
	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
	"github.com/haconnect/haconnect/spoa/authz"
)

// meshScenario is one way of reaching the app.
type meshScenario struct {
	name string
	addr string
	tls  bool
	pids []int // processes of the data plane under test
	// variant is a per-feature variant's configuration (nil for the
	// scenarios), and instr its user-space instructions per request, by
	// side ("destination", "caller"), under callgrind.
	variant *variantConfig
	instr   map[string]float64
	rounds  map[string][]loadgen.Result
	cpu     map[string][]float64 // data plane CPU us per request
	// busy is the fraction of one core the data plane used (req/s x CPU
	// per request); cores the busy fraction of CPU 0 and CPU 1, whatever
	// ran there; gen the load generator's CPU us per request; load the
	// share of CPU 1 the generator and the app used.
	busy, core0, core1, gen, load map[string][]float64
}

// loadCase is one kind of load, run against each of its scenarios in
// every round.
type loadCase struct {
	key     string // the scenarios' rounds, cpu, ... are keyed by it
	conns   int
	path    string
	newConn bool
	// warm is how long the load runs before the measured window of dur:
	// connections (TLS handshakes on every hop) are set up outside it.
	warm, dur time.Duration
	scenarios []*meshScenario
	// repeat runs the scenarios this many times in each round (default
	// once): more, shorter samples where small differences matter.
	repeat int
}

// order is the scenarios in the order a round runs them.
func (lc *loadCase) order() []*meshScenario {
	var out []*meshScenario
	for i := 0; i < max(1, lc.repeat); i++ {
		out = append(out, lc.scenarios...)
	}
	return out
}

// measureScenario runs lc's load against sc and records it. The figures
// are those of a window of lc.dur after lc.warm, while the load runs:
// requests counted by the app, CPU by /proc; the latencies and errors are
// the generator's for the whole run.
func measureScenario(b *testing.B, app *benchAppServer, sc *meshScenario, lc *loadCase, tlsCfg *tls.Config, round int) (loadgen.Result, []int64) {
	cfg := loadgen.Config{Addr: sc.addr, Conns: lc.conns, Duration: lc.warm + lc.dur + 10*time.Second, NewConnPerRequest: lc.newConn, Path: lc.path}
	done, cancel := startWarmLoad(b, app, sc, cfg, tlsCfg, lc.warm)
	defer cancel()
	cores := loadgen.StartCores()
	meter := loadgen.StartCPU(sc.pids...)
	appMeter := loadgen.StartCPU(app.pid)
	sampler := startRSSSampler(sc.pids)
	n0, t0 := app.requests(b), time.Now()
	time.Sleep(lc.dur)
	n1, elapsed := app.requests(b), time.Since(t0)
	var used time.Duration
	var byProcess []string // each process's share, for the log
	for i, u := range meter.Stop() {
		used += u
		byProcess = append(byProcess, fmt.Sprintf("%d:%.1f", sc.pids[i], float64(u.Microseconds())/float64(max(1, n1-n0))))
	}
	core := cores.Stop()
	appUsed := appMeter.Stop()[0]
	peak := sampler()
	cancel()
	var res loadgen.Result
	select {
	case res = <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("%s (%s): the generator did not stop", sc.name, lc.key)
	}
	if res.Errors > 0 || res.Requests == 0 || n1 <= n0 {
		b.Fatalf("%s (%s): %d errors, %d requests in the run, %d in the measured window, e.g. %s", sc.name, lc.key, res.Errors, res.Requests, n1-n0, res.FirstError)
	}
	gen := float64(res.GeneratorCPU.Microseconds()) / float64(res.Requests)
	res.Requests, res.RPS = n1-n0, float64(n1-n0)/elapsed.Seconds()
	perReq := float64(used.Microseconds()) / float64(res.Requests)
	b.Logf("round %d %-24s %-48s %s, data plane %.1fus CPU/request (core busy %.2f; CPU 0 %.2f, CPU 1 %.2f; %s %.1fus/request, app %.1fus/request; by process %s)",
		round+1, lc.key, sc.name, res, perReq, res.RPS*perReq/1e6, core[0], core[1], res.Generator, gen, float64(appUsed.Microseconds())/float64(res.Requests), strings.Join(byProcess, " "))
	if sc.rounds == nil {
		sc.rounds, sc.cpu = map[string][]loadgen.Result{}, map[string][]float64{}
		sc.busy, sc.core0, sc.core1, sc.gen, sc.load = map[string][]float64{}, map[string][]float64{}, map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	}
	// The generator's CPU is known for its whole run only: its share of
	// the window is its CPU per request at the window's rate.
	load := gen*res.RPS/1e6 + appUsed.Seconds()/elapsed.Seconds()
	k := lc.key
	sc.rounds[k], sc.cpu[k] = append(sc.rounds[k], res), append(sc.cpu[k], perReq)
	sc.busy[k], sc.gen[k] = append(sc.busy[k], res.RPS*perReq/1e6), append(sc.gen[k], gen)
	sc.core0[k], sc.core1[k], sc.load[k] = append(sc.core0[k], core[0]), append(sc.core1[k], core[1]), append(sc.load[k], load)
	return res, peak
}

// matrixCell is one cell of the two-hop matrix: a body size and a number
// of keep-alive connections.
type matrixCell struct {
	key, body, path string
	conns           int
}

// matrixCells are the matrix's cells, the first being the keep-alive run
// of every scenario (key ka). The -short smoke runs one more cell only
// (32 connections: 512 take longer to set up than its runs last).
func matrixCells(short bool, ka string) []matrixCell {
	cells := []matrixCell{
		{key: ka, body: fmt.Sprintf("%d B", smallBody), path: "/", conns: 32},
		{key: fmt.Sprintf("%d B, 512 connections", smallBody), body: fmt.Sprintf("%d B", smallBody), path: "/", conns: 512},
		{key: "16 KiB, 32 connections", body: "16 KiB", path: bigPath, conns: 32},
		{key: "16 KiB, 512 connections", body: "16 KiB", path: bigPath, conns: 512},
	}
	if short {
		return []matrixCell{cells[0], cells[2]}
	}
	return cells
}

// startWarmLoad runs cfg's load against sc (with tlsCfg where sc takes
// mTLS) until cancelled or its duration ends, and returns once it has
// warmed up (warmUp); done receives its result.
func startWarmLoad(b *testing.B, app *benchAppServer, sc *meshScenario, cfg loadgen.Config, tlsCfg *tls.Config, warm time.Duration) (chan loadgen.Result, context.CancelFunc) {
	if sc.tls {
		cfg.TLS = tlsCfg
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan loadgen.Result, 1)
	go func() { done <- runLoad(ctx, cfg) }()
	warmUp(b, app, warm, done)
	return done, cancel
}

// warmUp lets a load run at least min, then until the app's request rate
// is steady: two successive 250 ms steps within 20% of each other, at
// most 2 s more (4 s after a min of 1 s or more), not in the -short
// smoke. Consul's proxy, for one, took over a second to set up 512
// connections on a busy machine. It returns early if the load ended.
// A min of 0 measures from the start (a new connection per request).
func warmUp(b *testing.B, app *benchAppServer, min time.Duration, done chan loadgen.Result) {
	const step = 250 * time.Millisecond
	if min == 0 {
		return
	}
	sleep := func(d time.Duration) bool {
		select {
		case res := <-done:
			done <- res // the caller reads it and reports the failure
			return false
		case <-time.After(d):
			return true
		}
	}
	if !sleep(min) {
		return
	}
	if testing.Short() {
		return // the smoke measures nothing
	}
	prev, last := app.requests(b), int64(-1)
	most := 2 * time.Second
	if min >= time.Second {
		most = 4 * time.Second
	}
	for deadline := time.Now().Add(most); time.Now().Before(deadline); {
		if !sleep(step) {
			return
		}
		cur := app.requests(b)
		rate := cur - prev
		if last > 0 && rate > 0 && float64(rate) >= 0.8*float64(last) && float64(rate) <= 1.25*float64(last) {
			return
		}
		prev, last = cur, rate
	}
}

// warmFor is the least time a keep-alive load of conns connections runs
// before warmUp looks for a steady rate: every hop's TLS handshakes
// (about 1 ms of CPU each) are done by then.
func warmFor(conns int) time.Duration {
	if conns > 100 && !testing.Short() {
		return time.Second
	}
	return 250 * time.Millisecond
}

// matrixDur is how long each of the matrix's extra runs lasts.
func matrixDur(short bool) time.Duration {
	if short {
		return 300 * time.Millisecond
	}
	return 2 * time.Second
}

// busyTarget is the share of its core a data plane must use in a
// keep-alive run for the run to measure the data plane, not the load.
const busyTarget = 0.90

// busyVerdict says whether sc's data plane kept its core busy in run k,
// and if not, what the cores' numbers point to.
func busyVerdict(sc *meshScenario, k string) string {
	busy, core0, core1, load := median(sc.busy[k]), median(sc.core0[k]), median(sc.core1[k]), median(sc.load[k])
	if busy >= busyTarget {
		return "ok"
	}
	var why []string
	if core1 >= 0.95 {
		if load >= 0.80 {
			why = append(why, fmt.Sprintf("the load side was the bottleneck: CPU 1 was saturated, %.0f%% of it the generator and the app", 100*load))
		} else {
			why = append(why, fmt.Sprintf("CPU 1 was saturated, only %.0f%% of it by the generator and the app: other processes ran there (a shared machine)", 100*load))
		}
	}
	if core0-busy >= 0.10 {
		why = append(why, fmt.Sprintf("other processes used %.0f%% of CPU 0 (a shared machine)", 100*(core0-busy)))
	}
	if len(why) == 0 {
		why = append(why, "neither core was saturated: the data plane waited on the load (too few requests in flight)")
	}
	return "**BELOW TARGET**: " + strings.Join(why, "; ")
}

// BenchmarkMesh is `make bench-mesh`: haconnect against the ceiling and the
// peers, in one run on one machine, alternating rounds, medians. The data
// planes under test share CPU 0; the load generator (wrk for plain HTTP,
// the Go client for mTLS and new connections), the app, the Consul agent
// and Consul's own work share CPU 1. Besides the scenarios, it runs the
// two-hop matrix (bodies x connections), the ceiling's parts (TCP mode, no
// TLS) and the per-feature variants (mesh_features_bench_test.go), and
// checks that every keep-alive run kept its data plane's core busy. With
// HACONNECT_BENCH_REPORT set it writes that Markdown file and a PNG chart
// next to it. -short is the CI smoke (about 10 s of load, no report).
func BenchmarkMesh(b *testing.B) {
	short := testing.Short()
	// Consul's proxy asks the agent's HTTP API on each new upstream
	// connection: at 512 connections opened at once it passed the agent's
	// default of 200 concurrent HTTP connections per client address (429,
	// then the proxy's connections failed). Every client here is 127.0.0.1.
	m := &mesh{consul: harness.StartConsul(b, "limits { http_max_conns_per_client = 4096 }")}
	m.consul.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
	m.consul.SetIntentions(b, "capi", harness.Source("cweb", api.IntentionActionAllow))
	app := startBenchApp(b)
	appPort := app.port
	bareAddr, barePid := bareMTLS(b, m.consul, appPort)
	ceilingAddr, ceilingPids := bareTwoHops(b, m.consul, appPort)
	// The ceiling's parts (keep-alive only): the same two HAProxies in TCP
	// mode, and each mode without TLS between them.
	var parts []*meshScenario
	for _, p := range []struct {
		name, mode string
		mTLS       bool
	}{{"C1 bare HAProxy two hops, TCP mode, mTLS", "tcp", true}, {"C2 bare HAProxy two hops, HTTP mode, no TLS", "http", false},
		{"C3 bare HAProxy two hops, TCP mode, no TLS", "tcp", false}} {
		addr, pids := bareTwoHopsWith(b, m.consul, appPort, p.mode, p.mTLS)
		parts = append(parts, &meshScenario{name: p.name, addr: addr, pids: pids})
	}
	apiIn := benchRegister(b, m, "api-1", appPort, "-admin-bind", fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b)))
	webIn := benchRegisterWeb(b, m, "web-1", "web", "api")
	// The same two hops with protocol tcp (L4, like Consul's proxy).
	m.consul.SetIntentions(b, "tapi", harness.Source("tweb", api.IntentionActionAllow))
	tapiIn := benchSidecar(b, m, benchService{id: "tapi-1", name: "tapi", protocol: "tcp", appPort: appPort,
		args: []string{"-threads", "1"}})
	twebIn := benchSidecar(b, m, benchService{id: "tweb-1", name: "tweb", protocol: "tcp", appPort: 1, upstream: "tapi",
		args: []string{"-threads", "1"}})
	capi, cweb := consulProxies(b, m, appPort)
	// The two hops again, the upstream routed by a discovery chain: a
	// router of ten routes (nine the load never matches, in front of the
	// catch-all) and a 50/50 split between two subsets, both the one
	// instance, so that only routing differs from scenario 4.
	m.consul.SetIntentions(b, "rapi", harness.Source("rweb", api.IntentionActionAllow))
	m.consul.SetProtocol(b, "rapi", "http")
	rapiIn := benchSidecar(b, m, benchService{id: "rapi-1", name: "rapi", protocol: "http", appPort: appPort,
		meta: map[string]string{"version": "v1", "bench": "yes"}, args: []string{"-threads", "1"}})
	rwebIn := benchRegisterWeb(b, m, "rweb-1", "rweb", "rapi")
	routedChain(b, m, "rapi")
	waitRouted(b, rwebIn, "rapi", 2)
	// The inbound again with a per-caller rate limit that the load never
	// reaches: what counting each caller's budget costs.
	m.consul.SetIntentions(b, "lapi", harness.Source("web", api.IntentionActionAllow))
	lapiIn := benchSidecar(b, m, benchService{id: "lapi-1", name: "lapi", protocol: "http", appPort: appPort,
		args:   []string{"-threads", "1", "-admin-bind", fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))},
		config: map[string]any{"rate_limits": map[string]any{"per_source": map[string]any{"*": map[string]any{"requests_per_second": 1e6, "requests_max_burst": 1e6}}}}})
	// The two hops again, the caller's intention an L7 one (HTTP
	// permissions on methods and path prefixes): each request is checked
	// by the destination's HAProxy against the permissions the sidecar
	// loaded in its maps (native L7 matching), with telemetry on as in 4.
	m.consul.SetProtocol(b, "l7api", "http")
	m.consul.SetIntentions(b, "l7api", &api.SourceIntention{Name: "l7web", Permissions: []*api.IntentionPermission{
		{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
		{Action: api.IntentionActionAllow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/", Methods: []string{"GET", "HEAD"}}},
	}})
	l7apiIn := benchSidecar(b, m, benchService{id: "l7api-1", name: "l7api", protocol: "http", appPort: appPort,
		args: []string{"-threads", "1", "-admin-bind", fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b))}})
	l7webIn := benchRegisterWeb(b, m, "l7web-1", "l7web", "l7api")
	roots, _ := m.consul.RootsPEM(b)
	tlsCfg := harness.ClientTLS(m.consul.IssueLeaf(b, "web"), roots)

	apiPids := append(haproxyPids(b, apiIn), apiIn.sidecar.Cmd.Process.Pid)
	webPids := append(haproxyPids(b, webIn), webIn.sidecar.Cmd.Process.Pid)
	scenarios := []*meshScenario{
		{name: "1 direct to the app", addr: fmt.Sprintf("127.0.0.1:%d", appPort)},
		{name: "2 bare HAProxy mTLS", addr: bareAddr, tls: true, pids: []int{barePid}},
		{name: "3 haconnect inbound", addr: fmt.Sprintf("127.0.0.1:%d", apiIn.port), tls: true, pids: apiPids},
		{name: "4 haconnect two hops", addr: fmt.Sprintf("127.0.0.1:%d", webIn.upstream["api"]), pids: append(append([]int{}, webPids...), apiPids...)},
		{name: "5 consul connect proxy two hops", addr: fmt.Sprintf("127.0.0.1:%d", cweb.upstream), pids: []int{cweb.pid, capi.pid}},
		{name: "6 haconnect two hops, protocol tcp", addr: fmt.Sprintf("127.0.0.1:%d", twebIn.upstream["tapi"]),
			pids: append(append(haproxyPids(b, twebIn), twebIn.sidecar.Cmd.Process.Pid), append(haproxyPids(b, tapiIn), tapiIn.sidecar.Cmd.Process.Pid)...)},
		{name: "7 haconnect two hops, routed (10 routes, split)", addr: fmt.Sprintf("127.0.0.1:%d", rwebIn.upstream["rapi"]),
			pids: append(append(haproxyPids(b, rwebIn), rwebIn.sidecar.Cmd.Process.Pid), append(haproxyPids(b, rapiIn), rapiIn.sidecar.Cmd.Process.Pid)...)},
		{name: "8 bare HAProxy two hops (the ceiling)", addr: ceilingAddr, pids: ceilingPids},
		{name: "9 haconnect inbound, per-caller rate limit", addr: fmt.Sprintf("127.0.0.1:%d", lapiIn.port), tls: true,
			pids: append(haproxyPids(b, lapiIn), lapiIn.sidecar.Cmd.Process.Pid)},
		{name: "10 haconnect two hops, L7 intention (HTTP permissions)", addr: fmt.Sprintf("127.0.0.1:%d", l7webIn.upstream["l7api"]),
			pids: append(append(haproxyPids(b, l7webIn), l7webIn.sidecar.Cmd.Process.Pid), append(haproxyPids(b, l7apiIn), l7apiIn.sidecar.Cmd.Process.Pid)...)},
	}
	// The per-feature variants of scenario 4 (mesh_features_bench_test.go).
	features := featureVariants(b, m, apiIn, webIn)
	// Every path must answer before it is measured: a new upstream instance
	// enters HAProxy's pool once its first health check passes.
	for _, sc := range append(append(append([]*meshScenario{}, scenarios...), features...), parts...) {
		client := &http.Client{Timeout: 2 * time.Second}
		scheme := "http"
		if sc.tls {
			client.Transport, scheme = &http.Transport{TLSClientConfig: tlsCfg}, "https"
		}
		harness.WaitFor(b, 30*time.Second, sc.name+" answering 200", func() bool {
			resp, err := client.Get(scheme + "://" + sc.addr + "/")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	}
	// Scenario 10 really checks each request: the permission denies /admin.
	harness.WaitFor(b, 30*time.Second, "l7web -> l7api /admin denied by its HTTP permission", func() bool {
		code, _, err := l7webIn.callPath("l7api", "/admin")
		return err == nil && code == http.StatusForbidden
	})
	// ... natively, in HAProxy: the denial (permission 1, code 2) is
	// counted in its table.
	if tbl := l7apiIn.admin(b, "show table haconnect_l7"); !strings.Contains(tbl, "key=l7web|l7api|2 ") {
		b.Fatalf("scenario 10's requests are not matched natively: haconnect_l7 holds\n%s", tbl)
	}
	for _, sc := range append(append(append([]*meshScenario{}, scenarios...), features...), parts...) {
		pinDataPlane(b, sc.pids...)
	}
	// The load side: the app (benchApp), Consul and this process.
	pinLoadSide(b, m.consul.Proc.Cmd.Process.Pid)
	defer pinTestProcess(b)()

	rounds, dur, newConnDur, modes := 3, 3*time.Second, 2*time.Second, []string{"keep-alive", "new connection per request"}
	if short {
		rounds, dur, modes = 1, 300*time.Millisecond, modes[:1]
	}
	cases := []*loadCase{{key: modes[0], conns: 32, warm: warmFor(32), dur: dur, scenarios: append(append([]*meshScenario{}, scenarios...), parts...)}}
	if !short {
		cases = append(cases, &loadCase{key: modes[1], conns: 8, newConn: true, dur: newConnDur, scenarios: scenarios})
	}
	// The two-hop matrix: response bodies of 100 B and 16 KiB, 32 and 512
	// keep-alive connections, for haconnect (http, tcp), Consul's proxy
	// and the ceiling. Its 100 B, 32 connections cell is the keep-alive run
	// above.
	matrix := []*meshScenario{scenarios[3], scenarios[5], scenarios[4], scenarios[7]}
	cells := matrixCells(short, modes[0])
	for _, c := range cells[1:] {
		cases = append(cases, &loadCase{key: c.key, conns: c.conns, path: c.path, warm: warmFor(c.conns), dur: matrixDur(short), scenarios: matrix})
	}
	cases = append(cases, &loadCase{key: featuresKey, conns: 32, warm: warmFor(32), dur: featureDur(short), scenarios: features, repeat: featureRepeat(short)})
	idleRSS := map[string]int64{"HAProxy (api sidecar)": rss(apiPids[0]) + rss(apiPids[1]), "haconnect sidecar incl. SPOA (api)": rss(apiPids[2]), "consul connect proxy (capi)": rss(capi.pid)}
	loadRSS := map[string]int64{}
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			for _, lc := range cases {
				for _, sc := range lc.order() {
					_, peak := measureScenario(b, app, sc, lc, tlsCfg, r)
					if strings.HasPrefix(sc.name, "3 ") && lc.key == "keep-alive" {
						loadRSS["HAProxy (api sidecar)"] = max(loadRSS["HAProxy (api sidecar)"], peak[0]+peak[1])
						loadRSS["haconnect sidecar incl. SPOA (api)"] = max(loadRSS["haconnect sidecar incl. SPOA (api)"], peak[2])
					}
					if strings.HasPrefix(sc.name, "5 ") && lc.key == "keep-alive" {
						loadRSS["consul connect proxy (capi)"] = max(loadRSS["consul connect proxy (capi)"], peak[1])
					}
				}
			}
		}
	}
	// The routed scenario really went through the chain: requests by
	// target backend (the split halves them).
	byTarget := map[string]string{}
	for _, line := range strings.Split(rwebIn.admin(b, "show stat -1 2 -1"), "\n") {
		if f := strings.Split(line, ","); len(f) > 7 && strings.HasPrefix(f[0], "upstream_rapi::") {
			byTarget[strings.TrimPrefix(f[0], "upstream_rapi::")] = f[7]
		}
	}
	b.Logf("routed scenario: sessions by chain target backend %v", byTarget)
	// Where each data plane's CPU goes (mesh_perf_bench_test.go).
	perfDur, profiled := 2*time.Second, append(append([]*meshScenario{}, scenarios...), parts...)
	if short {
		perfDur, profiled = 300*time.Millisecond, []*meshScenario{scenarios[1], scenarios[7]}
	}
	perf := profileAll(b, app, tlsCfg, profiled, perfDur)
	// The per-feature variants' instructions per request, under callgrind
	// (mesh_instructions_bench_test.go).
	instrDur := 5 * time.Second
	if short {
		instrDur = time.Second
	}
	featureInstructions(b, features, instrDur)
	flips := 50
	if short {
		flips = 5
	}
	flipP50, flipP99 := intentionFlips(b, m, apiIn, tlsCfg, flips)
	hit, miss := decisionCost(b, m)
	applies := applyTimes(b, m, short)

	rep := report{scenarios: scenarios, parts: parts, perf: perf, newConnDur: newConnDur, cases: cases, cells: cells, matrix: matrix, features: features, modes: modes, rounds: rounds, dur: dur, flips: flips, flipP50: flipP50, flipP99: flipP99,
		hit: hit, miss: miss, idleRSS: idleRSS, loadRSS: loadRSS, applies: applies}
	b.Log("\n" + rep.markdown())
	ka := "keep-alive"
	b.ReportMetric(medianRPS(scenarios[2].rounds[ka])/medianRPS(scenarios[1].rounds[ka]), "inbound/bare")
	b.ReportMetric(medianRPS(scenarios[3].rounds[ka])/medianRPS(scenarios[4].rounds[ka]), "haconnect/consul-2hop")
	b.ReportMetric(float64(flipP99.Microseconds())/1000, "flip-p99-ms")
	b.ReportMetric(medianRPS(scenarios[6].rounds[ka])/medianRPS(scenarios[3].rounds[ka]), "routed/2hop-req/s")
	b.ReportMetric(median(scenarios[6].cpu[ka])/median(scenarios[3].cpu[ka]), "routed/2hop-cpu")
	b.ReportMetric(median(scenarios[3].cpu[ka])/median(scenarios[7].cpu[ka]), "2hop/ceiling-cpu")
	b.ReportMetric(median(scenarios[8].cpu[ka])-median(scenarios[2].cpu[ka]), "ratelimit-cpu-us")
	worstRPS, worstCPU := math.Inf(1), 0.0
	for _, c := range cells {
		worstRPS = min(worstRPS, medianRPS(scenarios[5].rounds[c.key])/medianRPS(scenarios[4].rounds[c.key]))
		worstCPU = max(worstCPU, median(scenarios[5].cpu[c.key])/median(scenarios[4].cpu[c.key]))
	}
	for i, name := range []string{"spoe", "tagging", "telemetry", "identity", "retries", "every-feature"} {
		b.ReportMetric(featureCost(features[0], features[i+1]), name+"-cpu-us")
		b.ReportMetric(instrCost(features[0], features[i+1]), name+"-instr")
	}
	b.ReportMetric(medianRPS(scenarios[9].rounds[ka])/medianRPS(scenarios[3].rounds[ka]), "l7/2hop-req/s")
	b.ReportMetric(median(scenarios[3].cpu[ka])/median(scenarios[9].cpu[ka]), "l7/2hop-cpu")
	b.ReportMetric(worstRPS, "tcp/consul-req/s-worst-cell")
	b.ReportMetric(worstCPU, "tcp/consul-cpu-worst-cell")
	if path := os.Getenv("HACONNECT_BENCH_REPORT"); path != "" && !short {
		if err := os.WriteFile(path, []byte(rep.markdown()), 0o644); err != nil {
			b.Fatal(err)
		}
		png := strings.TrimSuffix(path, ".md") + ".png"
		if err := benchreport.Chart(png, "haconnect bench-mesh (medians of rounds; data planes on one core)", rep.chartPanels()); err != nil {
			b.Fatal(err)
		}
		b.Logf("wrote %s and %s", path, png)
	} else if err := benchreport.Chart(filepath.Join(b.TempDir(), "benchmarks.png"), "smoke", rep.chartPanels()); err != nil {
		b.Fatal(err) // the smoke draws the chart too, so that it cannot rot
	}
}

// scenarioKind is whose data plane a scenario measures, for the chart.
func scenarioKind(sc *meshScenario) benchreport.Kind {
	switch {
	case len(sc.pids) == 0:
		return benchreport.Other
	case strings.Contains(sc.name, "consul"):
		return benchreport.Consul
	case strings.Contains(sc.name, "bare HAProxy"):
		return benchreport.Ceiling
	case strings.HasPrefix(sc.name, "F"):
		return benchreport.Variant
	}
	return benchreport.Haconnect
}

// chartPanels is the chart: each haconnect scenario against its peers, in
// req/s and in data plane CPU per request, the two-hop matrix cell by
// cell, and the per-feature costs. Each haconnect bar notes its ratios to
// the peers that matter for it: bare mTLS for one hop, Consul's proxy and
// the ceiling for two.
func (r report) chartPanels() []benchreport.Panel {
	ka := "keep-alive"
	bare, consul, ceiling := r.scenarios[1], r.scenarios[4], r.scenarios[7]
	twoHop := func(sc *meshScenario) bool { return strings.Contains(sc.name, "two hops") }
	note := func(sc *meshScenario, k string, v func(*meshScenario, string) float64) string {
		if scenarioKind(sc) != benchreport.Haconnect && scenarioKind(sc) != benchreport.Consul {
			return ""
		}
		if !twoHop(sc) {
			return fmt.Sprintf("%.2fx bare mTLS", v(sc, k)/v(bare, k))
		}
		if sc == consul {
			return fmt.Sprintf("%.2fx ceiling", v(sc, k)/v(ceiling, k))
		}
		return fmt.Sprintf("%.2fx Consul's proxy, %.2fx ceiling", v(sc, k)/v(consul, k), v(sc, k)/v(ceiling, k))
	}
	rps := func(sc *meshScenario, k string) float64 { return medianRPS(sc.rounds[k]) }
	cpu := func(sc *meshScenario, k string) float64 { return median(sc.cpu[k]) }
	var reqs, cpus []benchreport.Bar
	for _, sc := range r.scenarios {
		reqs = append(reqs, benchreport.Bar{Label: sc.name, Value: rps(sc, ka), Kind: scenarioKind(sc), Note: note(sc, ka, rps)})
		if len(sc.pids) > 0 {
			cpus = append(cpus, benchreport.Bar{Label: sc.name, Value: cpu(sc, ka), Kind: scenarioKind(sc), Note: note(sc, ka, cpu)})
		}
	}
	panels := []benchreport.Panel{
		{Title: fmt.Sprintf("Keep-alive, 32 connections, %d B: req/s (longer is better)", smallBody), Unit: "req/s", Bars: reqs},
		{Title: "Keep-alive, 32 connections: data plane CPU per request (shorter is better)", Unit: "us", Format: "%.1f", Bars: cpus},
	}
	var mrps, mcpu []benchreport.Bar
	for _, c := range r.cells {
		group := fmt.Sprintf("%s body, %d connections", c.body, c.conns)
		for _, sc := range r.matrix {
			if len(sc.rounds[c.key]) == 0 {
				continue
			}
			mrps = append(mrps, benchreport.Bar{Group: group, Label: sc.name, Value: rps(sc, c.key), Kind: scenarioKind(sc), Note: note(sc, c.key, rps)})
			mcpu = append(mcpu, benchreport.Bar{Group: group, Label: sc.name, Value: cpu(sc, c.key), Kind: scenarioKind(sc), Note: note(sc, c.key, cpu)})
		}
	}
	panels = append(panels,
		benchreport.Panel{Title: "Two hops by body and connections: data plane CPU per request (shorter is better)", Unit: "us", Format: "%.1f", Bars: mcpu},
		benchreport.Panel{Title: "Two hops by body and connections: req/s (longer is better)", Unit: "req/s", Bars: mrps})
	if len(r.features) > 0 {
		var costs []benchreport.Bar
		all := cpu(r.features[0], featuresKey)
		for _, v := range r.features[1:] {
			c := featureCost(r.features[0], v)
			costs = append(costs, benchreport.Bar{Label: strings.TrimSpace(v.name[strings.Index(v.name, " "):]), Value: c,
				Kind: benchreport.Variant, Note: fmt.Sprintf("(%.0f%% of all on)", 100*c/all)})
		}
		plain, l7 := r.scenarios[3], r.scenarios[9]
		c := pairedDiff(l7.cpu[ka], plain.cpu[ka])
		costs = append(costs, benchreport.Bar{Label: "L7 check on (10 against 4)", Value: c, Kind: benchreport.Haconnect,
			Note: fmt.Sprintf("(%.0f%% of 4)", 100*c/cpu(plain, ka))})
		panels = append(panels, benchreport.Panel{Title: "Two hops, http: CPU per request each feature costs (its variant against all on)", Unit: "us", Format: "%+.1f", Bars: costs})
	}
	return panels
}

// intentionFlips measures, over n flips, the time from an intention write
// returning to the first new connection denied by the api sidecar.
func intentionFlips(b *testing.B, m *mesh, in *instance, tlsCfg *tls.Config, n int) (p50, p99 time.Duration) {
	url := fmt.Sprintf("https://127.0.0.1:%d/", in.port)
	get := func() int {
		code, _, _ := getOnce(tlsCfg, url, 5*time.Second)
		return code
	}
	var took []time.Duration
	for i := 0; i < n; i++ {
		m.consul.SetIntentions(b, "api", harness.Source("web", api.IntentionActionDeny))
		took = append(took, harness.WaitFor(b, 5*time.Second, "web denied", func() bool { return get() == 403 }))
		m.consul.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
		harness.WaitFor(b, 5*time.Second, "web allowed", func() bool { return get() == 200 })
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	return took[len(took)/2], took[min(len(took)-1, len(took)*99/100)]
}

type cost struct{ nsPerOp, allocs float64 }

// decisionCost measures the authorizer alone, in this process: a cached
// decision and a first decision (certificate parse, trust domain,
// intentions walk).
func decisionCost(b *testing.B, m *mesh) (hit, miss cost) {
	az, err := authz.New(authz.Config{Consul: m.consul.Config(), Metrics: authz.NewMetrics(nil), MaxEntries: 1})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	az.Start(ctx, "api")
	if err := az.Ready(ctx, "api"); err != nil {
		b.Fatal(err)
	}
	certs := m.consul.Callers(b, "web", 8)
	// testing.Benchmark cannot run inside a benchmark (they share a lock),
	// so this times a fixed second of calls itself.
	measure := func(f func(i int)) cost {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		start, n, span := time.Now(), 0, time.Second
		if testing.Short() {
			span = 200 * time.Millisecond
		}
		for time.Since(start) < span {
			for k := 0; k < 1000; k++ {
				f(n)
				n++
			}
		}
		elapsed := time.Since(start)
		runtime.ReadMemStats(&after)
		return cost{float64(elapsed.Nanoseconds()) / float64(n), float64(after.Mallocs-before.Mallocs) / float64(n)}
	}
	hit = measure(func(int) { az.Decide("api", certs[0]) })
	miss = measure(func(i int) { az.Decide("api", certs[i%len(certs)]) })
	return hit, miss
}

type applyTime struct {
	instances int
	start     time.Duration // first configuration with that many instances
	addOneP50 time.Duration // one more instance: Consul write -> HAProxy serving it
	addOneMax time.Duration
	method    string
}

// applyTimes measures how applying changes grows with the number of
// upstream instances: a client sidecar whose upstream "many" has N
// instances (no process behind them: only configuration matters here).
func applyTimes(b *testing.B, m *mesh, short bool) []applyTime {
	sizes := []int{10, 100, 1000}
	if short {
		sizes = []int{10}
	}
	register := func(i int) {
		err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			Kind: api.ServiceKindConnectProxy, ID: fmt.Sprintf("many-%d-sidecar-proxy", i), Name: "many-sidecar-proxy",
			Address: "127.0.0.3", Port: 20000 + i,
			Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "many", LocalServicePort: 1},
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	var out []applyTime
	next := 0
	for _, n := range sizes {
		for ; next < n; next++ {
			register(next)
		}
		began := time.Now()
		in := benchRegisterWeb(b, m, fmt.Sprintf("client-%d", n), "client", "many")
		harness.WaitFor(b, 60*time.Second, fmt.Sprintf("%d instances in the pool", n), func() bool {
			return strings.Count(in.admin(b, "show stat upstream_many 4 -1"), "127.0.0.3:") >= n
		})
		at := applyTime{instances: n, start: time.Since(began)}
		var adds []time.Duration
		for k := 0; k < 5; k++ {
			start := time.Now()
			register(next)
			port := 20000 + next
			next++
			deadline := time.Now().Add(60 * time.Second)
			for !strings.Contains(in.admin(b, "show stat upstream_many 4 -1"), fmt.Sprintf("127.0.0.3:%d", port)) {
				if time.Now().After(deadline) {
					b.Fatalf("instance %d never reached HAProxy", port)
				}
				time.Sleep(500 * time.Microsecond)
			}
			adds = append(adds, time.Since(start))
		}
		sort.Slice(adds, func(i, j int) bool { return adds[i] < adds[j] })
		at.addOneP50, at.addOneMax = adds[len(adds)/2], adds[len(adds)-1]
		at.method = "runtime"
		if strings.Count(in.sidecar.Output(), "method=reload") > 0 {
			at.method = "runtime, reload when the slots grew"
		}
		out = append(out, at)
		in.sidecar.Kill()
	}
	return out
}

type report struct {
	scenarios        []*meshScenario
	cases            []*loadCase
	cells            []matrixCell
	matrix           []*meshScenario // 4 http, 6 tcp, 5 consul proxy, 8 ceiling
	features         []*meshScenario // F0 all on, then one feature off each
	parts            []*meshScenario // the ceiling in TCP mode, and without TLS
	perf             perfBreakdown
	newConnDur       time.Duration
	modes            []string
	rounds           int
	dur              time.Duration
	flips            int
	flipP50, flipP99 time.Duration
	hit, miss        cost
	idleRSS, loadRSS map[string]int64
	applies          []applyTime
}

func (r report) markdown() string {
	var s strings.Builder
	cpuModel := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				cpuModel = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	hv, _ := exec.Command("haproxy", "-v").Output()
	fmt.Fprintf(&s, "# haconnect benchmarks\n\nGenerated by `make bench-mesh` (`BenchmarkMesh` in `e2e/mesh_bench_test.go`) on %s.\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&s, "Machine: %d CPUs (%s), Linux, %s; HAProxy %s; Consul v1.16.3.\n\n", runtime.NumCPU(), cpuModel, runtime.Version(), strings.Fields(string(hv) + " ? ? ?")[2])
	s.WriteString(r.targets())
	s.WriteString(r.missedReasons())
	fmt.Fprintf(&s, "Method: the scenarios run in alternating rounds (%d rounds per scenario and load), medians reported. "+
		"Each run measures a window (keep-alive %s; new connections %s; the matrix %s; the feature variants %s, %d a round); a keep-alive run is measured after a warm-up that sets up the connections "+
		"(at least 0.25s, 1s at 512 connections, then until the app's request rate is steady over two 250ms steps); "+
		"requests are counted by the app over the window, latencies are the generator's over the whole run. "+
		"The data planes under test (HAProxy with one thread, the haconnect process with its SPOA, Consul's proxies) are pinned to CPU 0; "+
		"the load generator, the app (a one-thread HAProxy answering 200 with a %d-byte body, or 16 KiB at `%s`) and the Consul agent to CPU 1. "+
		"Generators: `wrk` (one thread) for keep-alive plain HTTP entry points (the two-hop scenarios enter at the caller sidecar's plain upstream port); "+
		"for mTLS entry points (a client certificate, which wrk cannot present) and for a new connection per request, `internal/testkit/loadgen`, "+
		"a Go HTTP/1.1 client that parses responses without allocating. "+
		"CPU/request is the data plane's user+system time (from /proc) per request; "+
		"core busy is req/s x CPU/request, the share of its core the data plane used (target > %.2f in every keep-alive run). "+
		"The Consul agent allows 4096 concurrent HTTP connections per client (default 200), which Consul's proxy needs at 512 connections. "+
		"TLS: between two HAProxies (haconnect's sidecars, the ceiling and C1) TLS 1.2 with ECDHE-ECDSA-AES128-GCM-SHA256, what the sidecars negotiate "+
		"(Envoy's client default too); the Go client and Consul's proxies negotiate TLS 1.3 with AES-128-GCM.\n\n",
		r.rounds, r.dur, r.newConnDur, matrixDur(false), featureDur(false), featureRepeat(false), smallBody, bigPath, busyTarget)
	base := map[string]float64{}
	consulRPS := map[string]float64{}
	ceiling := r.scenarios[7]
	for _, mode := range r.modes {
		base[mode] = medianRPS(r.scenarios[1].rounds[mode])
		consulRPS[mode] = medianRPS(r.scenarios[4].rounds[mode])
	}
	for _, mode := range r.modes {
		conns := 32
		if mode != "keep-alive" {
			conns = 8
		}
		fmt.Fprintf(&s, "## %s (%d connections, %d-byte body)\n\n| scenario | req/s | vs 2 (bare mTLS) | vs 5 (consul proxy) | vs 8 (ceiling) | p50 | p99 | data plane CPU/request | CPU vs 8 (ceiling) | data plane core busy |\n|---|---|---|---|---|---|---|---|---|---|\n", mode, conns, smallBody)
		for _, sc := range r.scenarios {
			rs := sc.rounds[mode]
			var p50 []float64
			for _, x := range rs {
				p50 = append(p50, float64(x.P50))
			}
			cpu, cpuRatio := "-", "-"
			if len(sc.pids) > 0 {
				cpu = fmt.Sprintf("%.1f us", median(sc.cpu[mode]))
				cpuRatio = fmt.Sprintf("%.2fx", median(sc.cpu[mode])/median(ceiling.cpu[mode]))
			}
			busy := "-"
			if len(sc.pids) > 0 {
				busy = fmt.Sprintf("%.2f", median(sc.busy[mode]))
				if mode == "keep-alive" && median(sc.busy[mode]) < busyTarget {
					busy = "**" + busy + "** (below target)"
				}
			}
			fmt.Fprintf(&s, "| %s | %.0f | %.2f | %.2f | %.2f | %s | %s | %s | %s | %s |\n", sc.name, medianRPS(rs), medianRPS(rs)/base[mode], medianRPS(rs)/consulRPS[mode],
				medianRPS(rs)/medianRPS(ceiling.rounds[mode]), time.Duration(median(p50)).Round(time.Microsecond), medianP99(rs).Round(time.Microsecond), cpu, cpuRatio, busy)
		}
		s.WriteString("\n")
	}
	ka := "keep-alive"
	plain, routed := r.scenarios[3], r.scenarios[6]
	fmt.Fprintf(&s, "Discovery chain routing (7 against 4, keep-alive): %.2fx the req/s, %.2fx the data plane CPU per request "+
		"(a service-router of ten routes, the load matching the last, and a 50/50 service-splitter between two subsets of the same instance).\n\n",
		medianRPS(routed.rounds[ka])/medianRPS(plain.rounds[ka]), median(routed.cpu[ka])/median(plain.cpu[ka]))
	inbound, limited := r.scenarios[2], r.scenarios[8]
	fmt.Fprintf(&s, "A per-caller rate limit on the inbound path (9 against 3, keep-alive, a budget the load never reaches): "+
		"%+.1f us of data plane CPU per request (%.2fx), %.2fx the req/s.\n\n",
		median(limited.cpu[ka])-median(inbound.cpu[ka]), median(limited.cpu[ka])/median(inbound.cpu[ka]),
		medianRPS(limited.rounds[ka])/medianRPS(inbound.rounds[ka]))
	l7 := r.scenarios[9]
	fmt.Fprintf(&s, "A caller with HTTP permissions (10 against 4, keep-alive; an L7 intention, every request matched natively by the destination's HAProxy): "+
		"%.2fx the req/s, %.2fx the CPU efficiency (4's CPU per request over 10's; target >= 0.85), %+.1f us of data plane CPU per request.\n\n",
		medianRPS(l7.rounds[ka])/medianRPS(plain.rounds[ka]), median(plain.cpu[ka])/median(l7.cpu[ka]), median(l7.cpu[ka])-median(plain.cpu[ka]))
	s.WriteString(r.matrixTables())
	s.WriteString(r.ceilingParts())
	s.WriteString(r.perfTable())
	s.WriteString(r.syscallTable())
	s.WriteString(r.featureTable())
	s.WriteString(r.generatorCheck())
	fmt.Fprintf(&s, "![keep-alive req/s](benchmarks.png)\n\n## Authorization\n\n")
	fmt.Fprintf(&s, "| | figure |\n|---|---|\n")
	fmt.Fprintf(&s, "| decision at cache hit (one core) | %.0f ns, %.0f allocs -> %.1f M decisions/s |\n", r.hit.nsPerOp, r.hit.allocs, 1e3/r.hit.nsPerOp)
	fmt.Fprintf(&s, "| decision at cache miss (certificate parse, trust domain, intentions walk) | %.1f us, %.0f allocs -> %.0f k decisions/s |\n", r.miss.nsPerOp/1e3, r.miss.allocs, 1e6/r.miss.nsPerOp)
	fmt.Fprintf(&s, "| intention write -> first denied new connection (%d flips) | p50 %s, p99 %s |\n\n", r.flips, r.flipP50.Round(10*time.Microsecond), r.flipP99.Round(10*time.Microsecond))
	fmt.Fprintf(&s, "## Memory (RSS)\n\n| process | idle | under keep-alive load |\n|---|---|---|\n")
	var names []string
	for k := range r.idleRSS {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(&s, "| %s | %.1f MiB | %.1f MiB |\n", k, float64(r.idleRSS[k])/(1<<20), float64(r.loadRSS[k])/(1<<20))
	}
	fmt.Fprintf(&s, "\n## Applying changes vs upstream instances\n\n| instances | sidecar start -> HAProxy serving all of them | one more instance: Consul write -> in HAProxy's pool (p50 / max of 5) | applied by |\n|---|---|---|---|\n")
	for _, a := range r.applies {
		fmt.Fprintf(&s, "| %d | %s | %s / %s | %s |\n", a.instances, a.start.Round(time.Millisecond), a.addOneP50.Round(100*time.Microsecond), a.addOneMax.Round(100*time.Microsecond), a.method)
	}
	s.WriteString("\nCommand: `make bench-mesh` (about 9 minutes on 2 cores; writes this file and `docs/benchmarks.png`).\n")
	return s.String()
}

// targets is the report's summary of issue 18's targets, each met or
// missed, from the figures below it.
func (r report) targets() string {
	ka, nc := "keep-alive", "new connection per request"
	sc := r.scenarios
	bare, inbound, http2, consul, tcp, ceiling, l7 := sc[1], sc[2], sc[3], sc[4], sc[5], sc[7], sc[9]
	rps := func(x *meshScenario, k string) float64 { return medianRPS(x.rounds[k]) }
	cpu := func(x *meshScenario, k string) float64 { return median(x.cpu[k]) }
	var s strings.Builder
	s.WriteString("## Targets\n\n| target | measured | |\n|---|---|---|\n")
	row := func(target, measured string, ok bool) {
		verdict := "met"
		if !ok {
			verdict = "**missed**"
		}
		fmt.Fprintf(&s, "| %s | %s | %s |\n", target, measured, verdict)
	}
	hc := cpu(http2, ka) / cpu(ceiling, ka)
	row("two hops, http: CPU/request <= 1.15x the ceiling (8)", fmt.Sprintf("%.2fx (%.1f us against %.1f us)", hc, cpu(http2, ka), cpu(ceiling, ka)), hc <= 1.15)
	allMet, worst, worstCell, worstR, worstC := true, math.Inf(1), "", 0.0, 0.0
	for _, c := range r.cells {
		if len(tcp.rounds[c.key]) == 0 {
			continue
		}
		rr, cc := rps(tcp, c.key)/rps(consul, c.key), cpu(consul, c.key)/cpu(tcp, c.key)
		allMet = allMet && rr >= 1 && cc >= 1
		if min(rr, cc) < worst {
			worst, worstCell, worstR, worstC = min(rr, cc), fmt.Sprintf("%s, %d connections", c.body, c.conns), rr, cc
		}
	}
	row("two hops, tcp (6): >= 1.0x Consul's proxy (5) in req/s and CPU efficiency, every matrix cell",
		fmt.Sprintf("worst cell %s: %.2fx req/s, %.2fx CPU efficiency", worstCell, worstR, worstC), allMet)
	ir, ic := rps(inbound, ka)/rps(bare, ka), cpu(bare, ka)/cpu(inbound, ka)
	row("full inbound (3): >= 0.90 of bare HAProxy mTLS (2) in req/s and CPU efficiency", fmt.Sprintf("%.2fx req/s, %.2fx CPU efficiency", ir, ic), ir >= 0.9 && ic >= 0.9)
	lr, lc := rps(l7, ka)/rps(http2, ka), cpu(http2, ka)/cpu(l7, ka)
	row("a caller with HTTP permissions (10): >= 0.85 of an L4-only caller (4)", fmt.Sprintf("%.2fx req/s, %.2fx CPU efficiency", lr, lc), lr >= 0.85 && lc >= 0.85)
	if len(http2.rounds[nc]) > 0 {
		nr := rps(http2, nc) / rps(consul, nc)
		row("new connection per request: two hops (4) >= 10x Consul's proxy (5)", fmt.Sprintf("%.1fx req/s", nr), nr >= 10)
	}
	below, runs := 0, 0
	for _, lc := range r.cases {
		for _, x := range lc.scenarios {
			if !lc.newConn && len(x.pids) > 0 && len(x.busy[lc.key]) > 0 {
				runs++
				if median(x.busy[lc.key]) < busyTarget {
					below++
				}
			}
		}
	}
	row(fmt.Sprintf("every keep-alive run keeps its data plane's core > %.0f%% busy (generator check below)", 100*busyTarget),
		fmt.Sprintf("%d of %d runs below", below, runs), below == 0)
	s.WriteString("\n")
	return s.String()
}

// The per-feature variants by index (meshFeatures): F0 all on, then each
// feature off alone, then every one off.
const (
	featureSPOE = iota + 1
	featureTagging
	featureTelemetry
	featureIdentity
	featureRetries
	featureEvery
)

// missedReasons says, for each of the two targets that rest on the
// features' cost (two hops against the ceiling, the inbound path against
// bare mTLS) and that this run missed, what the features measured in the
// same run cost against what the target leaves them.
func (r report) missedReasons() string {
	if len(r.features) <= featureEvery {
		return ""
	}
	ka := "keep-alive"
	cpu := func(x *meshScenario) float64 { return median(x.cpu[ka]) }
	bare, inbound, http2, ceiling := r.scenarios[1], r.scenarios[2], r.scenarios[3], r.scenarios[7]
	f := r.features
	cost := func(i int) float64 { return featureCost(f[0], f[i]) }
	instr := func(i int) string {
		if f[i].instr == nil {
			return "-"
		}
		return fmt.Sprintf("%.1fk", instrCost(f[0], f[i])/1000)
	}
	var s strings.Builder
	ceilingMissed := cpu(http2)/cpu(ceiling) > 1.15
	inboundMissed := cpu(bare)/cpu(inbound) < 0.9 || medianRPS(inbound.rounds[ka])/medianRPS(bare.rounds[ka]) < 0.9
	tcpMissed := r.tcpCellsMissed()
	if !ceilingMissed && !inboundMissed && len(tcpMissed) == 0 {
		return ""
	}
	s.WriteString("### Why the missed targets are missed (figures from this run)\n\n")
	if len(tcpMissed) > 0 {
		fmt.Fprintf(&s, "- **tcp against Consul's proxy.** Missed in %s. Round by round (req/s ratio, CPU efficiency ratio): %s. "+
			"Both proxies do the same work per request here, the kernel's sockets and the TLS records of two hops%s; "+
			"with the smallest requests that per-request overhead weighs most, and the larger cells are ahead.\n",
			strings.Join(tcpMissed, " and "), r.tcpRounds(), r.tcpSyscalls())
	}
	if ceilingMissed {
		every := f[featureEvery]
		fmt.Fprintf(&s, "- **Two hops, http, against the ceiling.** The target leaves haconnect's features %.1f us per request (0.15 of the ceiling's %.1f us); "+
			"scenario 4 runs %.1f us above the ceiling. Every feature switched off at once (F%d in the per-feature table) saves %.1f us per request "+
			"(%s instructions) and runs at %.2fx the ceiling's CPU per request%s. Each one alone (CPU, then instructions per request): retries %+.1f us, %s "+
			"(a `retry-on` past `conn-failure` makes HAProxy 2.6 copy each request's whole buffer, 16 KiB, to be able to send it again); "+
			"tagging %+.1f us, %s; telemetry %+.1f us, %s; the upstream identity check %+.1f us, %s; the SPOE filter %+.1f us, %s. "+
			"Each is a documented feature of the sidecar (README, \"The sidecar\"); none is switched off to reach the number.\n",
			0.15*cpu(ceiling), cpu(ceiling), cpu(http2)-cpu(ceiling), featureEvery, cost(featureEvery), instr(featureEvery),
			median(every.cpu[featuresKey])/cpu(ceiling), restOfPath(median(every.cpu[featuresKey])/cpu(ceiling)),
			cost(featureRetries), instr(featureRetries), cost(featureTagging), instr(featureTagging), cost(featureTelemetry), instr(featureTelemetry),
			cost(featureIdentity), instr(featureIdentity), cost(featureSPOE), instr(featureSPOE))
	}
	if inboundMissed {
		every := f[featureEvery]
		fmt.Fprintf(&s, "- **Full inbound against bare mTLS.** 0.90 of bare mTLS's CPU efficiency leaves the inbound path %.1f us per request "+
			"over bare mTLS's %.1f us; it runs %.1f us above it%s. ", cpu(bare)/0.9-cpu(bare), cpu(bare), cpu(inbound)-cpu(bare), r.sameSyscalls(bare, inbound))
		if f[0].instr != nil && every.instr != nil && instrCost(f[0], every) > 0 {
			dst := f[0].instr["destination"] - every.instr["destination"]
			perInstr := cost(featureEvery) / instrCost(f[0], every)
			fmt.Fprintf(&s, "The destination's features run %.1fk instructions a request (F0 against F%d on the destination: %.1fk against %.1fk; "+
				"tagging %s, telemetry %s), about %.1f us at what an instruction of these features costs in this run (F0 against F%d: %.1f us for %.1fk), "+
				"against the %.1f us the target leaves. ",
				dst/1000, featureEvery, f[0].instr["destination"]/1000, every.instr["destination"]/1000, instr(featureTagging), instr(featureTelemetry),
				dst*perInstr, featureEvery, cost(featureEvery), instrCost(f[0], every)/1000, cpu(bare)/0.9-cpu(bare))
		}
		s.WriteString("Tagging (identity headers, x-forwarded-client-cert, x-request-id, traceparent) and exact per-caller telemetry are on every request by design.\n")
	}
	s.WriteString("\n")
	return s.String()
}

// sameSyscalls gives a and b's system calls per request, when counted.
func (r report) sameSyscalls(a, b *meshScenario) string {
	ca, cb := r.perf.syscalls[a.name], r.perf.syscalls[b.name]
	if ca == nil || cb == nil {
		return ""
	}
	if math.Abs(cb["total"]-ca["total"]) <= 0.05*ca["total"] {
		return fmt.Sprintf(", with %.1f system calls a request against %.1f (table below): the difference is in user space", cb["total"], ca["total"])
	}
	return fmt.Sprintf(", with %.1f system calls a request against %.1f (table below)", cb["total"], ca["total"])
}

// tcpSyscalls compares the system calls per request of tcp (6) and
// Consul's proxy (5), when they were counted.
func (r report) tcpSyscalls() string {
	tcp, consul := r.perf.syscalls[r.scenarios[5].name], r.perf.syscalls[r.scenarios[4].name]
	if tcp == nil || consul == nil {
		return ""
	}
	if tcp["total"] > consul["total"] {
		return fmt.Sprintf(", but HAProxy 2.6 makes %.1f system calls a request for it against %.1f for Consul's proxy (system call table below)", tcp["total"], consul["total"])
	}
	return fmt.Sprintf(" (%.1f system calls a request against %.1f for Consul's proxy, system call table below)", tcp["total"], consul["total"])
}

// tcpCellsMissed names the matrix cells where tcp (6) is behind Consul's
// proxy (5) in req/s or CPU per request.
func (r report) tcpCellsMissed() []string {
	tcp, consul := r.scenarios[5], r.scenarios[4]
	var out []string
	for _, c := range r.cells {
		if len(tcp.rounds[c.key]) == 0 || len(consul.rounds[c.key]) == 0 {
			continue
		}
		if medianRPS(tcp.rounds[c.key]) < medianRPS(consul.rounds[c.key]) || median(tcp.cpu[c.key]) > median(consul.cpu[c.key]) {
			out = append(out, fmt.Sprintf("the %s, %d connections cell", c.body, c.conns))
		}
	}
	return out
}

// tcpRounds gives, for each missed cell, each round's ratios of tcp (6)
// to Consul's proxy (5): how far from parity the rounds were.
func (r report) tcpRounds() string {
	tcp, consul := r.scenarios[5], r.scenarios[4]
	var cells []string
	for _, c := range r.cells {
		t, k := tcp.rounds[c.key], consul.rounds[c.key]
		if len(t) == 0 || len(k) == 0 || (medianRPS(t) >= medianRPS(k) && median(tcp.cpu[c.key]) <= median(consul.cpu[c.key])) {
			continue
		}
		var rounds []string
		for i := 0; i < min(len(t), len(k)); i++ {
			rounds = append(rounds, fmt.Sprintf("%.2fx/%.2fx", t[i].RPS/k[i].RPS, consul.cpu[c.key][i]/tcp.cpu[c.key][i]))
		}
		cells = append(cells, fmt.Sprintf("%s, %d connections: %s", c.body, c.conns, strings.Join(rounds, ", ")))
	}
	return strings.Join(cells, "; ")
}

// restOfPath says what every feature off against the ceiling (ratio)
// shows: within 5% of it, the features are what separates the two.
func restOfPath(ratio float64) string {
	if ratio <= 1.05 {
		return ": what separates haconnect from the ceiling is its features, not how the rest is rendered"
	}
	return fmt.Sprintf(": the rest of the rendered path costs %.0f%% more than the ceiling too", 100*(ratio-1))
}

// ceilingParts is the report's breakdown of the ceiling's CPU per
// request: HTTP processing and the mTLS between the hops, from the same
// two bare HAProxies in TCP mode and without TLS.
func (r report) ceilingParts() string {
	if len(r.parts) < 3 {
		return ""
	}
	ka := "keep-alive"
	ceiling, consul := r.scenarios[7], r.scenarios[4]
	tcpTLS, httpPlain, tcpPlain := r.parts[0], r.parts[1], r.parts[2]
	cpu := func(x *meshScenario) float64 { return median(x.cpu[ka]) }
	var s strings.Builder
	s.WriteString("## Where the ceiling's CPU goes (keep-alive, 32 connections)\n\nThe ceiling's two bare HAProxies again, in TCP mode and without TLS between them " +
		"(the client's side stays plain HTTP, the app the same), in the same rounds.\n\n")
	s.WriteString("| scenario | req/s | data plane CPU/request | core busy |\n|---|---|---|---|\n")
	for _, x := range []*meshScenario{ceiling, tcpTLS, httpPlain, tcpPlain, consul} {
		fmt.Fprintf(&s, "| %s | %.0f | %.1f us | %.2f |\n", x.name, medianRPS(x.rounds[ka]), cpu(x), median(x.busy[ka]))
	}
	fmt.Fprintf(&s, "\nHTTP processing on both hops (8 against C1): %.1f us per request (%.0f%% of the ceiling). "+
		"mTLS between the hops: %.1f us in HTTP mode (8 against C2, %.0f%%), %.1f us in TCP mode (C1 against C3). "+
		"The ceiling against Consul's proxy (5): %+.1f us per request.\n\n",
		cpu(ceiling)-cpu(tcpTLS), 100*(cpu(ceiling)-cpu(tcpTLS))/cpu(ceiling), cpu(ceiling)-cpu(httpPlain), 100*(cpu(ceiling)-cpu(httpPlain))/cpu(ceiling),
		cpu(tcpTLS)-cpu(tcpPlain), cpu(ceiling)-cpu(consul))
	return s.String()
}

// matrixTables is the report's two-hop matrix: each scenario's req/s,
// CPU per request and core busy share in each cell, then the ratios the
// issue's targets are about.
func (r report) matrixTables() string {
	var s strings.Builder
	h, tcp, consul, ceiling := r.matrix[0], r.matrix[1], r.matrix[2], r.matrix[3]
	fmt.Fprintf(&s, "## Two-hop matrix (keep-alive)\n\nResponse bodies of %d B and 16 KiB, 32 and 512 connections; %d rounds of %s per cell "+
		"(the %d B, 32 connections cell is the keep-alive run above). Lower CPU/request is better.\n\n", smallBody, r.rounds, matrixDur(false), smallBody)
	s.WriteString("| body | connections | scenario | req/s | data plane CPU/request | core busy | req/s vs 5 (consul proxy) | CPU vs 5 | req/s vs 8 (ceiling) | CPU vs 8 |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range r.cells {
		for _, sc := range r.matrix {
			if len(sc.rounds[c.key]) == 0 {
				continue
			}
			fmt.Fprintf(&s, "| %s | %d | %s | %.0f | %.1f us | %.2f | %.2fx | %.2fx | %.2fx | %.2fx |\n", c.body, c.conns, sc.name,
				medianRPS(sc.rounds[c.key]), median(sc.cpu[c.key]), median(sc.busy[c.key]),
				medianRPS(sc.rounds[c.key])/medianRPS(consul.rounds[c.key]), median(sc.cpu[c.key])/median(consul.cpu[c.key]),
				medianRPS(sc.rounds[c.key])/medianRPS(ceiling.rounds[c.key]), median(sc.cpu[c.key])/median(ceiling.cpu[c.key]))
		}
	}
	s.WriteString("\n### The targets, cell by cell\n\n")
	s.WriteString("| body | connections | 6 tcp vs 5 consul proxy, req/s (target >= 1.0) | 6 tcp vs 5, CPU/request (target <= 1.0) | 4 http vs 8 ceiling, req/s | 4 http vs 8 ceiling, CPU/request (target <= 1.15) | what protocol tcp gains: 6 vs 4, req/s | 6 vs 4, CPU/request |\n|---|---|---|---|---|---|---|---|\n")
	mark := func(v float64, ok bool) string {
		if ok {
			return fmt.Sprintf("%.2fx", v)
		}
		return fmt.Sprintf("**%.2fx** (missed)", v)
	}
	for _, c := range r.cells {
		if len(h.rounds[c.key]) == 0 {
			continue
		}
		tr := medianRPS(tcp.rounds[c.key]) / medianRPS(consul.rounds[c.key])
		tc := median(tcp.cpu[c.key]) / median(consul.cpu[c.key])
		hr := medianRPS(h.rounds[c.key]) / medianRPS(ceiling.rounds[c.key])
		hc := median(h.cpu[c.key]) / median(ceiling.cpu[c.key])
		fmt.Fprintf(&s, "| %s | %d | %s | %s | %.2fx | %s | %.2fx | %.2fx |\n", c.body, c.conns, mark(tr, tr >= 1), mark(tc, tc <= 1), hr, mark(hc, hc <= 1.15),
			medianRPS(tcp.rounds[c.key])/medianRPS(h.rounds[c.key]), median(tcp.cpu[c.key])/median(h.cpu[c.key]))
	}
	s.WriteString("\n")
	return s.String()
}

// generatorCheck is the report's check that every keep-alive run measured
// the data plane, not the load: per run, how busy the data plane kept its
// core, both cores' load, and what the generator spent per request, with
// a visible note for each run below the target.
func (r report) generatorCheck() string {
	var s, notes strings.Builder
	fmt.Fprintf(&s, "## Generator check (keep-alive runs)\n\nA run measures the data plane only if the data plane kept its core busy: "+
		"target > %.2f of CPU 0 (req/s x CPU/request). CPU 0 and CPU 1 are the cores' busy shares from /proc/stat, whatever ran there "+
		"(CPU 1: the generator, the app, Consul). Generator CPU/request is wrk's or the Go client's own CPU time per request; "+
		"the generator + app share of CPU 1 is theirs alone over the window, and the rate at which the load side would saturate CPU 1 "+
		"is req/s over that share (where the generator saturates: above the data plane's rate, the generator was not the limit).\n\n", busyTarget)
	s.WriteString("| load | scenario | generator | req/s | data plane core busy | CPU 0 busy | CPU 1 busy | generator + app share of CPU 1 | generator CPU/request | the load side saturates at | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	below := 0
	for _, lc := range r.cases {
		if lc.newConn {
			continue
		}
		for _, sc := range lc.scenarios {
			if len(sc.pids) == 0 || len(sc.rounds[lc.key]) == 0 {
				continue
			}
			k := lc.key
			v := busyVerdict(sc, k)
			if v != "ok" {
				below++
				fmt.Fprintf(&notes, "- %s, %s: data plane core busy %.2f. %s.\n", lc.key, sc.name, median(sc.busy[k]), strings.TrimPrefix(v, "**BELOW TARGET**: "))
			}
			fmt.Fprintf(&s, "| %s | %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.1f us | ~%.0f req/s | %s |\n", k, sc.name, sc.rounds[k][0].Generator,
				medianRPS(sc.rounds[k]), median(sc.busy[k]), median(sc.core0[k]), median(sc.core1[k]), median(sc.load[k]), median(sc.gen[k]),
				medianRPS(sc.rounds[k])/max(median(sc.load[k]), 0.01), v)
		}
	}
	s.WriteString("\n")
	if below > 0 {
		fmt.Fprintf(&s, "> **WARNING: %d keep-alive run(s) did not keep the data plane's core %.0f%% busy**; their req/s understate the data plane "+
			"(their CPU/request still holds):\n>\n", below, 100*busyTarget)
		for _, line := range strings.Split(strings.TrimSpace(notes.String()), "\n") {
			s.WriteString("> " + line + "\n")
		}
		s.WriteString("\n")
	} else {
		fmt.Fprintf(&s, "Every keep-alive run kept the data plane's core above %.0f%% busy.\n\n", 100*busyTarget)
	}
	return s.String()
}

// routedChain writes service's discovery chain for the routed scenario:
// subsets a and b (two filters on the same instance's Meta), a 50/50
// split between them, and a router whose nine routes match path prefixes,
// an exact path, a regex, headers, a query parameter and methods that the
// load's "GET /" never has, so that every request walks all of them to
// the catch-all.
func routedChain(b testing.TB, m *mesh, service string) {
	b.Helper()
	set := func(e api.ConfigEntry) {
		if ok, _, err := m.consul.Client.ConfigEntries().Set(e, nil); err != nil || !ok {
			b.Fatalf("write %s %s: ok=%v err=%v", e.GetKind(), e.GetName(), ok, err)
		}
	}
	set(&api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: service, Subsets: map[string]api.ServiceResolverSubset{
		"a": {Filter: `Service.Meta.version == v1`}, "b": {Filter: `Service.Meta.bench == yes`}}})
	set(&api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: service, Splits: []api.ServiceSplit{
		{Weight: 50, ServiceSubset: "a"}, {Weight: 50, ServiceSubset: "b"}}})
	to := func(subset string) *api.ServiceRouteDestination {
		return &api.ServiceRouteDestination{ServiceSubset: subset}
	}
	match := func(h api.ServiceRouteHTTPMatch) *api.ServiceRouteMatch { return &api.ServiceRouteMatch{HTTP: &h} }
	set(&api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: service, Routes: []api.ServiceRoute{
		{Match: match(api.ServiceRouteHTTPMatch{PathPrefix: "/admin/"}), Destination: to("a")},
		{Match: match(api.ServiceRouteHTTPMatch{PathExact: "/healthz"}), Destination: to("a")},
		{Match: match(api.ServiceRouteHTTPMatch{PathRegex: "/v[0-9]+/orders/[0-9]+"}), Destination: to("b")},
		{Match: match(api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "x-tenant", Exact: "t1"}}}), Destination: to("b")},
		{Match: match(api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "x-canary", Present: true}}}), Destination: to("b")},
		{Match: match(api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "x-env", Prefix: "stag"}}}), Destination: to("a")},
		{Match: match(api.ServiceRouteHTTPMatch{QueryParam: []api.ServiceRouteHTTPMatchQueryParam{{Name: "debug", Exact: "1"}}}), Destination: to("a")},
		{Match: match(api.ServiceRouteHTTPMatch{PathPrefix: "/api/", Methods: []string{"POST", "PUT"}}), Destination: to("b")},
		{Match: match(api.ServiceRouteHTTPMatch{PathPrefix: "/static/"}), Destination: &api.ServiceRouteDestination{ServiceSubset: "a", PrefixRewrite: "/"}},
	}})
}

// waitRouted waits until in's HAProxy serves its upstream dest through at
// least n chain target backends (named <upstream backend>::<target>) with
// a server up in each: the routed scenario must not measure the plain
// path while the chain is not applied yet.
func waitRouted(b testing.TB, in *instance, dest string, n int) {
	b.Helper()
	harness.WaitFor(b, 30*time.Second, fmt.Sprintf("%s's chain in %s's HAProxy (%d target backends with a server up)", dest, in.id, n), func() bool {
		up := map[string]bool{}
		for _, line := range strings.Split(in.admin(b, "show stat -1 4 -1"), "\n") {
			f := strings.Split(line, ",")
			if len(f) > 17 && strings.HasPrefix(f[0], "upstream_"+dest+"::") && strings.HasPrefix(f[17], "UP") {
				up[f[0]] = true
			}
		}
		return len(up) >= n
	})
}
