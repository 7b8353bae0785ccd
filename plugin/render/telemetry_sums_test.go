package render

import (
	"fmt"
	"io"
	"maps"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// TestThreadSumsAreExact runs the rendered rules that keep telemetry's
// latency sum by thread (the template's text, unchanged) in a real HAProxy
// with four threads. The latency comes from a request header instead of
// the clock, so that the sum is known: 16 connections of two callers send
// 4,000 requests at once, with latencies up to 2^29 us (the low word
// carries every few requests) and some negative ones (a clock stepped
// back: they add nothing). The callers' sums read from the table, added
// over threads as lua/haconnect.lua does, must equal the sums sent, and
// several threads must have written.
func TestThreadSumsAreExact(t *testing.T) {
	dir := harness.TempDir(t)
	m := model()
	m.AdminBind = "127.0.0.1:9901"
	m.LatencyMapFile = harness.WriteFile(t, dir, "latency_buckets.map", m.LatencyMapText())
	out, err := Render(m)
	if err != nil {
		t.Fatal(err)
	}
	rules := block(t, out.Config, "    # Telemetry's latency bucket and sum")
	table := block(t, out.Config, "backend "+SumTable)
	for _, want := range []string{"track-sc1 var(txn.hc_skey) table " + SumTable, "sc-inc-gpc0(1)", "sc-set-gpt(0,1)", "sc-set-gpt(1,1)"} {
		if !strings.Contains(rules, want) {
			t.Fatalf("the rendered thread sum rules have no %q:\n%s", want, rules)
		}
	}

	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	defer app.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	cfg := fmt.Sprintf(`global
    nbthread 4
    stats socket %s mode 600 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend f
    bind %s
    http-request set-var(txn.hc_ckey) req.hdr(x-caller)
    http-request set-var(txn.hc_lat) req.hdr(x-lat),add(0)
%s
    default_backend app
backend app
    server app %s
%s
`, filepath.Join(dir, "admin.sock"), addr, rules, app.Listener.Addr(), table)
	harness.StartHAProxy(t, dir, cfg, addr)

	callers := []string{"web|api", "batch|api"}
	want := map[string]int64{}
	wantBuckets := map[string]int64{} // "<bucket>|<caller>" -> answers
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for c := 0; c < 16; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(c)))
			caller := callers[c%2]
			cl := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			for i := 0; i < 250; i++ {
				lat := rng.Int63n(1 << 29)
				if i%2 == 0 { // within the buckets (up to 10 s) and past them
					lat = rng.Int63n(12_000_000)
				}
				if i%50 == 7 {
					lat = -rng.Int63n(1000) - 1
				}
				req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/", nil)
				req.Header.Set("x-caller", caller)
				req.Header.Set("x-lat", strconv.FormatInt(lat, 10))
				resp, err := cl.Do(req)
				if err != nil {
					errs <- err
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				mu.Lock()
				if lat > 0 {
					want[caller] += lat
				}
				wantBuckets[fmt.Sprintf("%d|%s", bucketOf(lat), caller)]++
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	text, err := haproxy.NewAdmin(filepath.Join(dir, "admin.sock")).Command("show table " + SumTable)
	if err != nil {
		t.Fatal(err)
	}
	got, gotBuckets := map[string]int64{}, map[string]int64{}
	threads := map[string]bool{}
	entry := regexp.MustCompile(` key=(\d+)\|(\d+)\|(\S+) .*gpc0=(\d+) .*gpt0=(\d+) gpt1=(\d+)`)
	for _, line := range strings.Split(text, "\n") {
		if e := entry.FindStringSubmatch(line); e != nil {
			n, _ := strconv.ParseInt(e[4], 10, 64)
			lo, _ := strconv.ParseInt(e[5], 10, 64)
			hi, _ := strconv.ParseInt(e[6], 10, 64)
			got[e[3]] += hi*SumCarry + lo
			gotBuckets[e[2]+"|"+e[3]] += n
			threads[e[1]] = true
		}
	}
	for _, c := range callers {
		if got[c] != want[c] {
			t.Errorf("%s: sum %d from the table, %d sent (%+d)", c, got[c], want[c], got[c]-want[c])
		}
	}
	if !maps.Equal(gotBuckets, wantBuckets) {
		t.Errorf("answers by bucket and caller: %v in the table, %v sent", gotBuckets, wantBuckets)
	}
	if len(threads) < 2 {
		t.Errorf("entries of %d thread(s), want several:\n%s", len(threads), text)
	}
}

// bucketOf is the latency bucket of lat microseconds (0-based), as the
// rendered map has it: past the last, or negative, len(latencyBucketsUS).
func bucketOf(lat int64) int {
	for i, r := range latencyRanges() {
		if lat >= int64(r.Lo) && lat <= int64(r.Hi) {
			return i
		}
	}
	return len(latencyBucketsUS)
}

// block returns the lines of text from the one starting with first to the
// next empty line.
func block(t *testing.T, text, first string) string {
	t.Helper()
	i := strings.Index(text, "\n"+first)
	if i < 0 {
		t.Fatalf("no %q in the rendered configuration", first)
	}
	rest := text[i+1:]
	if j := strings.Index(rest, "\n\n"); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// TestSumLayout: the latency sum is kept by thread in SumTable unless an
// instance or route rate limit holds sc1; then by bit counters in the
// caller's entry. Either way the scraper is told which (HACONNECT_SUM_*).
func TestSumLayout(t *testing.T) {
	for name, c := range map[string]struct {
		limits  *RateLimits
		threads bool
	}{
		"no rate limit":          {nil, true},
		"per-source limit":       {&RateLimits{PerSource: map[string]Budget{"web": {RequestsPerSecond: 10, RequestsMaxBurst: 10}}}, true},
		"instance limit":         {&RateLimits{Instance: &Budget{RequestsPerSecond: 10, RequestsMaxBurst: 10}}, false},
		"route limit":            {&RateLimits{Routes: []RouteLimit{{PathPrefix: "/x", Budget: Budget{RequestsPerSecond: 1, RequestsMaxBurst: 1}}}}, false},
		"connections per caller": {&RateLimits{ConnectionsPerSecond: 5}, true},
	} {
		m := model()
		m.AdminBind = "127.0.0.1:9901"
		m.RateLimitMapFile = "/d/rate_limits.map"
		m.Inbound.RateLimits = c.limits
		out, err := Render(m)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		cfg := out.Config
		// The bit counters' rules ("if { var(txn.hc_lat),and(<mask>) gt 0 }"),
		// in one of the two inbound backends (each renders them).
		bits := strings.Count(section(cfg, "backend "+CheckBackend), "gt 0 }\n")
		hasTable := strings.Contains(cfg, "\nbackend "+SumTable+"\n")
		if c.threads {
			if !hasTable || bits != 0 || !strings.Contains(cfg, "setenv HACONNECT_SUM_TABLE "+SumTable+"\n") || !strings.Contains(cfg, "setenv HACONNECT_SUM_BITS 0\n") {
				t.Errorf("%s: want thread sums (table %v, %d bit rules)", name, hasTable, bits)
			}
		} else if hasTable || bits != sumBits || !strings.Contains(cfg, "setenv HACONNECT_SUM_TABLE -\n") || !strings.Contains(cfg, fmt.Sprintf("setenv HACONNECT_SUM_BITS %d\n", sumBits)) {
			t.Errorf("%s: want bit counters (table %v, %d bit rules)", name, hasTable, bits)
		}
	}
}

// section is the part of cfg from the line header to the next section.
func section(cfg, header string) string {
	_, rest, ok := strings.Cut(cfg, "\n"+header+"\n")
	if !ok {
		return ""
	}
	for _, next := range []string{"\nbackend ", "\nfrontend ", "\nlisten "} {
		if before, _, found := strings.Cut(rest, next); found {
			rest = before
		}
	}
	return rest
}
