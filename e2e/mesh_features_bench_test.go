package e2e

// The per-feature cost table of `make bench-mesh`: the two-hop HTTP path
// (scenario 4) with each haconnect feature switched off alone, without a
// knob in the product. The configurations that the api and web sidecars
// rendered are copied, the feature's rules removed by their exact text,
// and each variant runs as its own pair of HAProxy processes with the
// same certificate files, SPOA and app, measured like the other scenarios.

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// cfgEdit changes one side's rendered configuration. A rule is a line's
// text without its indentation, written exactly as the template renders
// it ({api}, {apiURI}, {webURI}, {apiDir}, {webDir} stand for the
// instances' values), or "re:" and a regular expression matching a whole
// line (substituted first, so values in it must not need quoting). Every rule must match at least one line, or the benchmark fails:
// a variant must never measure a feature that is no longer there.
type cfgEdit struct {
	side    string              // "caller" (web) or "destination" (api)
	remove  []string            // rules deleted
	replace map[string][]string // rule -> the lines put in its place
}

// feature is one variant of the two-hop path: the features' rules as
// plugin/render/haproxy.cfg.tmpl writes them. A rule names what the
// feature does (the header a tagging rule writes, the variable a
// telemetry rule sets) and leaves free only how it computes it, so that
// an optimisation of a rule's expression keeps the table valid while a
// rule that disappears or is renamed fails the benchmark: then change it
// here too.
type feature struct {
	name  string
	edits []cfgEdit
}

func meshFeatures() []feature {
	fs := singleFeatures()
	// Every feature off at once, measured in one pair of runs: what they
	// cost together, which a sum of the single costs (each with its own
	// noise) tells less well, and how near the ceiling (scenario 8) the
	// rest of the rendered configurations is.
	every := feature{name: everyFeatureOff}
	for _, f := range fs[1:] {
		every.edits = append(every.edits, f.edits...)
	}
	return append(fs, every)
}

// everyFeatureOff names the variant with every feature of singleFeatures
// switched off.
const everyFeatureOff = "every feature above off"

// singleFeatures are F0, all features on, then one variant per feature
// switched off alone.
func singleFeatures() []feature {
	whenChecked := " if { var(txn.hc_check) -m bool }"
	header := func(name string) string { return `re:http-request (add|set)-header ` + regexp.QuoteMeta(name) + ` .*` }
	return []feature{
		{name: "all features on (the rendered configurations, copied)"},
		{name: "SPOE filter (authorization) off, a fixed allow in its place", edits: []cfgEdit{{side: "destination",
			remove: []string{
				"filter spoe engine haconnect config {apiDir}/spoe.conf",
				`re:http-request send-spoe-group haconnect l7h? .*`,
			},
			replace: map[string][]string{"http-request send-spoe-group haconnect authz" + whenChecked: {
				"http-request set-var(sess.haconnect.auth) bool(true)" + whenChecked,
				"http-request set-var(sess.haconnect.source) str(web)" + whenChecked,
				"http-request set-var(sess.haconnect.spiffe) str({webURI})" + whenChecked,
				"http-request set-var(sess.haconnect.ttl_ms) int(1000)" + whenChecked,
			}},
		}}},
		{name: "tagging headers off", edits: []cfgEdit{{side: "destination", remove: []string{
			`re:http-request del-header \^x\[-_\].* -m reg`,
			header("x-haconnect-source"),
			header("x-haconnect-spiffe"),
			header("x-haconnect-destination"),
			`re:http-request set-var\(sess\.hc_cert_hash\) .*`,
			header("x-forwarded-client-cert"),
			header("x-request-id"),
			`re:http-request set-var\(txn\.hc_tp\) .*`,
			header("traceparent"),
		}}}},
		{name: "telemetry off", edits: []cfgEdit{{side: "destination", remove: []string{
			`re:http-request set-var\(txn\.hc_t0\) .*`,
			`re:http-request set-var\(txn\.hc_ckey\) .*`,
			"http-request track-sc0 var(txn.hc_ckey) table haconnect_callers",
			`re:http-response set-var\(txn\.hc_lat\) .*`,
			`re:http-response sc-inc-gpc\(\d+,0\) .*`,
			`re:http-response set-var\(txn\.hc_(bkt|skey|sum)\) .*`,
			"http-response track-sc1 var(txn.hc_skey) table haconnect_sums",
			"http-response sc-inc-gpc0(1)",
			`re:http-response sc-set-gpt\(\d,1\) .*`,
		}}}},
		// The check's decision exactly; the variables it is computed
		// through (the peer's ID looked up by certificate, then by the
		// Lua parse) by pattern.
		{name: "upstream identity check off", edits: []cfgEdit{{side: "caller", remove: []string{
			"http-response deny deny_status 502 unless { var(txn.hc_peer) -m str {apiURI} }",
			`re:http-response (unset-var|set-var)\(txn\.hc_(peer|idn)\)( .*)?`,
		}}}},
		{name: "retries off", edits: []cfgEdit{{side: "caller",
			remove: []string{
				`re:option redispatch( .*)?`,
				`re:retry-on .*`,
				`re:http-request disable-l7-retry .*`,
			},
			replace: map[string][]string{`re:retries \d+`: {"retries 0"}},
		}}},
	}
}

// ruleMatcher matches a rule against a line's text.
func ruleMatcher(b testing.TB, rule string) func(string) bool {
	if re, ok := strings.CutPrefix(rule, "re:"); ok {
		r, err := regexp.Compile("^(?:" + re + ")$")
		if err != nil {
			b.Fatalf("rule %q: %v", rule, err)
		}
		return r.MatchString
	}
	return func(line string) bool { return line == rule }
}

// applyEdit applies e to cfg's lines. It fails the benchmark, naming the
// rule, when a rule matches no line.
func applyEdit(b testing.TB, variant, side, cfgPath string, lines []string, e cfgEdit, subst *strings.Replacer) []string {
	type op struct {
		rule string
		with []string
	}
	var ops []op
	for _, r := range e.remove {
		ops = append(ops, op{rule: r})
	}
	for r, with := range e.replace {
		ops = append(ops, op{rule: r, with: with})
	}
	for _, o := range ops {
		rule := subst.Replace(o.rule)
		match := ruleMatcher(b, rule)
		var out []string
		found := 0
		for _, line := range lines {
			text := strings.TrimSpace(line)
			if !match(text) {
				out = append(out, line)
				continue
			}
			found++
			indent := line[:len(line)-len(strings.TrimLeft(line, " \t"))]
			for _, w := range o.with {
				out = append(out, indent+subst.Replace(w))
			}
		}
		if found == 0 {
			b.Fatalf("per-feature variant %q: the rule\n\t%s\nis not in the %s's rendered configuration (%s): the template changed, so this "+
				"variant would not switch the feature off. Update the rule table in e2e/mesh_features_bench_test.go (meshFeatures) "+
				"to the template's new rules.", variant, rule, side, cfgPath)
		}
		lines = out
	}
	return lines
}

var bindLine = regexp.MustCompile(`^(\s*bind\s+)(\S+):(\d+)(.*)$`)

// relocate makes a copy of a rendered configuration runnable beside the
// sidecar's own HAProxy: every bind gets the port that ports maps its old
// port to (new ones are taken as needed), the admin socket moves to dir,
// and the listeners fd transfer is dropped (no master here).
func relocate(b testing.TB, lines []string, dir string, ports map[int]int) []string {
	sockets := 0
	var out []string
	for _, line := range lines {
		text := strings.TrimSpace(line)
		if strings.HasPrefix(text, "stats socket ") {
			sockets++
			out = append(out, "    stats socket "+filepath.Join(dir, "admin.sock")+" mode 600 level admin")
			continue
		}
		if m := bindLine.FindStringSubmatch(line); m != nil {
			old, _ := strconv.Atoi(m[3])
			if _, ok := ports[old]; !ok {
				ports[old] = harness.FreePort(b)
			}
			line = fmt.Sprintf("%s%s:%d%s", m[1], m[2], ports[old], m[4])
		}
		out = append(out, line)
	}
	if sockets != 1 {
		b.Fatalf("a rendered configuration with %d stats socket lines (1 expected)", sockets)
	}
	return out
}

// pointUpstream replaces the server slots of the caller's upstream backend
// (addresses the sidecar sets through the runtime API; the file has
// placeholders) with one server at addr, after the backend's
// default-server line, which carries the TLS settings.
func pointUpstream(b testing.TB, lines []string, backend, addr, cfgPath string) []string {
	var out []string
	in, placed, slots := false, false, 0
	slot := regexp.MustCompile(`^server s\d+ `)
	for _, line := range lines {
		text := strings.TrimSpace(line)
		if strings.HasPrefix(text, "backend ") || strings.HasPrefix(text, "frontend ") {
			in = text == "backend "+backend
		}
		if in && slot.MatchString(text) {
			slots++
			continue
		}
		out = append(out, line)
		if in && strings.HasPrefix(text, "default-server ") && !placed {
			out = append(out, "    server s1 "+addr)
			placed = true
		}
	}
	if !placed || slots == 0 {
		b.Fatalf("backend %s in %s: no default-server line or no server slots (%d): the template changed; update pointUpstream in e2e/mesh_features_bench_test.go", backend, cfgPath, slots)
	}
	return out
}

// featureVariants starts, for each feature of meshFeatures, the two-hop
// path with that feature off: copies of apiIn's (destination) and webIn's
// (caller, upstream "api") rendered configurations, edited, each run by its
// own one-thread HAProxy. The destination's copy keeps asking the api
// sidecar's SPOA, whose process is counted in the variant's CPU.
func featureVariants(b *testing.B, m *mesh, apiIn, webIn *instance) []*meshScenario {
	read := func(in *instance) (string, []string) {
		p := filepath.Join(in.dir, "haproxy.cfg")
		data, err := os.ReadFile(p)
		if err != nil {
			b.Fatal(err)
		}
		return p, strings.Split(string(data), "\n")
	}
	apiPath, apiLines := read(apiIn)
	webPath, webLines := read(webIn)
	subst := strings.NewReplacer("{api}", "api", "{apiURI}", m.consul.IssueLeaf(b, "api").URI, "{webURI}", m.consul.IssueLeaf(b, "web").URI,
		"{apiDir}", apiIn.dir, "{webDir}", webIn.dir)
	var out []*meshScenario
	for i, f := range meshFeatures() {
		v := &variantConfig{dst: append([]string(nil), apiLines...), src: append([]string(nil), webLines...),
			apiPath: apiPath, webPath: webPath, inboundPort: apiIn.port, upstreamPort: webIn.upstream["api"]}
		for _, e := range f.edits {
			switch e.side {
			case "destination":
				v.dst = applyEdit(b, f.name, e.side, apiPath, v.dst, e, subst)
			case "caller":
				v.src = applyEdit(b, f.name, e.side, webPath, v.src, e, subst)
			default:
				b.Fatalf("feature %q: side %q", f.name, e.side)
			}
		}
		p := v.place(b, false)
		hd := harness.StartHAProxy(b, p.dstDir, p.dst, p.inbound)
		hs := harness.StartHAProxy(b, p.srcDir, p.src, p.entry)
		out = append(out, &meshScenario{name: fmt.Sprintf("F%d %s", i, f.name), addr: p.entry, variant: v,
			pids: []int{hs.Proc.Cmd.Process.Pid, hd.Proc.Cmd.Process.Pid, apiIn.sidecar.Cmd.Process.Pid}})
	}
	return out
}

// variantConfig is one variant's two configurations, edited, as the
// sidecars wrote them (their paths and ports).
type variantConfig struct {
	dst, src                  []string
	apiPath, webPath          string
	inboundPort, upstreamPort int // the api sidecar's inbound port, web's upstream port for api
}

// placedVariant is a variant's configurations moved to new directories
// and free ports, the caller's upstream pointed at the destination.
type placedVariant struct {
	dstDir, srcDir string
	dst, src       string // configuration texts
	inbound, entry string // the destination's inbound, the caller's entry (plain HTTP)
}

// place moves v to new directories and free ports. noChecks drops the
// caller's health checks (their TLS handshakes would count with the
// requests in an instruction count).
func (v *variantConfig) place(b testing.TB, noChecks bool) placedVariant {
	ports := map[int]int{}
	dir := harness.TempDir(b)
	p := placedVariant{dstDir: filepath.Join(dir, "destination"), srcDir: filepath.Join(dir, "caller")}
	for _, d := range []string{p.dstDir, p.srcDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			b.Fatal(err)
		}
	}
	dst := relocate(b, v.dst, p.dstDir, ports)
	inbound, ok := ports[v.inboundPort]
	if !ok {
		b.Fatalf("%s binds no listener on the inbound port %d", v.apiPath, v.inboundPort)
	}
	src := relocate(b, v.src, p.srcDir, ports)
	entry, ok := ports[v.upstreamPort]
	if !ok {
		b.Fatalf("%s binds no listener on the upstream port %d", v.webPath, v.upstreamPort)
	}
	p.inbound, p.entry = fmt.Sprintf("127.0.0.1:%d", inbound), fmt.Sprintf("127.0.0.1:%d", entry)
	src = pointUpstream(b, src, "upstream_api", p.inbound, v.webPath)
	if noChecks {
		for i, l := range src {
			if strings.HasPrefix(strings.TrimSpace(l), "default-server ") {
				src[i] = healthCheck.ReplaceAllString(l, "$2")
			}
		}
	}
	p.dst, p.src = strings.Join(dst, "\n"), strings.Join(src, "\n")
	return p
}

// healthCheck is a default-server line's health check settings.
var healthCheck = regexp.MustCompile(` check( inter \S+| fall \d+| rise \d+)*(\s|$)`)

// featureDur is how long each variant's measured window lasts, and
// featureRepeat how many windows a round takes of each: a feature's cost
// is a difference of a few microseconds, and more samples give steadier
// medians than longer ones on a shared machine.
func featureDur(short bool) time.Duration {
	if short {
		return 300 * time.Millisecond
	}
	return 1500 * time.Millisecond
}

func featureRepeat(short bool) int {
	if short {
		return 1
	}
	return 2
}

// featureTable is the report's per-feature cost table.
func (r report) featureTable() string {
	if len(r.features) == 0 {
		return ""
	}
	var s strings.Builder
	k := featuresKey
	all := r.features[0]
	fmt.Fprintf(&s, "## Per-feature cost (two hops, http, keep-alive, 32 connections)\n\n"+
		"The configurations the api and web sidecars rendered for scenario 4, copied, each feature's rules removed by their exact text "+
		"(`e2e/mesh_features_bench_test.go`; the benchmark fails if a rule is missing), each variant run as its own pair of one-thread "+
		"HAProxies with the same certificates, SPOA and app, in the same rounds as the scenarios. SPOE off puts a fixed allow in place of "+
		"the authorization, so that requests still pass. Each round runs the variants twice. A feature's cost is the CPU per request it adds to F0 (all on): "+
		"the median of the differences between F0's run and the variant's run of the same round and repetition. "+
		"F0 against scenario 4 (the same configurations run by the sidecars): %.2fx the CPU per request. "+
		"Instructions: each variant's two HAProxies once more, each under valgrind's callgrind, a keep-alive wrk run of 2 connections "+
		"(the caller's health checks off): the user-space instructions each executed per request (destination + caller; `e2e/mesh_instructions_bench_test.go`). "+
		"A count does not move with what else the machine runs, as CPU time does; it leaves out the kernel's work (the same sockets and syscalls in every variant), "+
		"counts each byte of a `rep movsb` copy as one instruction and does not see glibc's malloc.\n\n",
		median(all.cpu[k])/median(r.scenarios[3].cpu["keep-alive"]))
	s.WriteString("| variant | req/s | data plane CPU/request | the feature's cost (CPU/request) | share of F0's CPU | core busy | instructions/request (destination + caller) | the feature's cost (instructions/request) |\n|---|---|---|---|---|---|---|---|\n")
	for i, v := range r.features {
		cost, share := "-", "-"
		if i > 0 {
			d := featureCost(all, v)
			cost, share = fmt.Sprintf("%+.1f us", d), fmt.Sprintf("%.0f%%", 100*d/median(all.cpu[k]))
		}
		fmt.Fprintf(&s, "| %s | %.0f | %.1f us | %s | %s | %.2f |%s\n", v.name, medianRPS(v.rounds[k]), median(v.cpu[k]), cost, share, median(v.busy[k]), instrColumns(all, v))
	}
	// The L7 check is a feature a caller's intention switches on: its cost
	// is scenario 10 against scenario 4, run by the sidecars.
	plain, l7 := r.scenarios[3], r.scenarios[9]
	d := pairedDiff(l7.cpu["keep-alive"], plain.cpu["keep-alive"])
	fmt.Fprintf(&s, "| L7 check on (scenario 10 against 4: an intention with HTTP permissions, each request matched natively) | %.0f | %.1f us | %+.1f us | %.0f%% of 4's CPU | %.2f | - | - |\n\n",
		medianRPS(l7.rounds["keep-alive"]), median(l7.cpu["keep-alive"]), d, 100*d/median(plain.cpu["keep-alive"]), median(l7.busy["keep-alive"]))
	return s.String()
}

// featureCost is what the feature v switches off costs: the median of the
// differences between F0's run and v's run of the same round and
// repetition (run a few seconds apart), which a shared machine's drift
// disturbs less than a difference of medians.
func featureCost(all, v *meshScenario) float64 {
	return pairedDiff(all.cpu[featuresKey], v.cpu[featuresKey])
}

// pairedDiff is the median of a[i]-b[i]: two series of runs taken in the
// same rounds.
func pairedDiff(a, b []float64) float64 {
	var d []float64
	for i := 0; i < min(len(a), len(b)); i++ {
		d = append(d, a[i]-b[i])
	}
	if len(d) == 0 {
		return 0
	}
	return median(d)
}

// featuresKey keys the variants' runs.
const featuresKey = "per-feature variants"
