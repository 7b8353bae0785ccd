package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// headerEcho is an app that answers with the request's headers as JSON.
func headerEcho(t *testing.T) *httptest.Server {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(r.Header)
	}))
	t.Cleanup(app.Close)
	return app
}

// scrape reads /metrics from an admin or metrics listener and parses it.
func scrape(t *testing.T, admin string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("/metrics: %d %s", resp.StatusCode, b)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics is not valid Prometheus text: %v", err)
	}
	return fams
}

// find is fam's first series whose labels include labels (nil if none, or
// if fam is nil).
func find(fam *dto.MetricFamily, labels map[string]string) *dto.Metric {
	for _, m := range fam.GetMetric() {
		if hasLabels(m, labels) {
			return m
		}
	}
	return nil
}

// hasLabels reports whether m has every label in labels, with its value.
func hasLabels(m *dto.Metric, labels map[string]string) bool {
	for k, v := range labels {
		found := false
		for _, lp := range m.GetLabel() {
			found = found || lp.GetName() == k && lp.GetValue() == v
		}
		if !found {
			return false
		}
	}
	return true
}

func TestTaggingAndTelemetry(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	admin := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	app := headerEcho(t)
	apiIn := m.register(&instance{id: "api-1", args: []string{"-admin-bind", admin}},
		"api", "http", app.Listener.Addr().(*net.TCPAddr).Port)
	harness.WaitListening(t, admin, 10*time.Second)
	roots, td := m.consul.RootsPEM(t)
	web, batch := m.consul.IssueLeaf(t, "web"), m.consul.IssueLeaf(t, "batch")
	inbound := fmt.Sprintf("https://127.0.0.1:%d/", apiIn.port)
	client := func(leaf *harness.Leaf) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			TLSClientConfig: harness.ClientTLS(leaf, roots), MaxIdleConnsPerHost: 64}}
	}
	webClient := client(web)
	get := func(h map[string]string) http.Header {
		t.Helper()
		req, _ := http.NewRequest("GET", inbound, nil)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := webClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var seen http.Header
		if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil || resp.StatusCode != 200 {
			t.Fatalf("status %d, decode %v", resp.StatusCode, err)
		}
		return seen
	}
	hexRE := func(n int) string { return fmt.Sprintf("[0-9a-f]{%d}", n) }

	t.Run("identity headers are set and spoofed ones replaced", func(t *testing.T) {
		h := get(map[string]string{
			"X-Haconnect-Source": "admin", "X-Haconnect-Anything": "x",
			"X-Forwarded-Client-Cert": "By=spiffe://evil;URI=spiffe://evil",
		})
		sum := sha256.Sum256(web.TLS.Certificate[0])
		apiURI := fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/api", td)
		want := map[string]string{
			"X-Haconnect-Source":      "web",
			"X-Haconnect-Spiffe":      web.URI,
			"X-Haconnect-Destination": "api",
			"X-Forwarded-Client-Cert": "By=" + apiURI + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + web.URI,
		}
		for k, v := range want {
			if got := h.Values(k); len(got) != 1 || got[0] != v {
				t.Errorf("%s = %q, want exactly %q", k, got, v)
			}
		}
		if h.Get("X-Haconnect-Anything") != "" {
			t.Error("a caller's x-haconnect-* header reached the app")
		}
	})

	t.Run("spoofed identity headers spelled with underscores are removed", func(t *testing.T) {
		h := get(map[string]string{})
		spoofed := get(map[string]string{
			"x_haconnect_source": "admin", "X-Haconnect_Spiffe": "spiffe://evil", "x_forwarded_client_cert": "URI=spiffe://evil",
		})
		fold := func(k string) string { return strings.ReplaceAll(strings.ToLower(k), "_", "-") }
		for k, v := range spoofed {
			if f := fold(k); strings.HasPrefix(f, "x-haconnect-") || f == "x-forwarded-client-cert" {
				if k != http.CanonicalHeaderKey(f) || len(v) != 1 || v[0] != h.Get(k) {
					t.Errorf("the app received %s: %q", k, v)
				}
			}
		}
	})

	t.Run("request id kept or created", func(t *testing.T) {
		if got := get(map[string]string{"X-Request-Id": "abc-123"}).Get("X-Request-Id"); got != "abc-123" {
			t.Errorf("caller's request id became %q", got)
		}
		made := get(nil).Get("X-Request-Id")
		if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(made) {
			t.Errorf("created request id %q is not a UUID v4", made)
		}
	})

	t.Run("traceparent propagated or started", func(t *testing.T) {
		trace, parent := strings.Repeat("4bf92f3577b34da6", 2), "00f067aa0ba902b7"
		got := get(map[string]string{"Traceparent": "00-" + trace + "-" + parent + "-01"}).Get("Traceparent")
		if !regexp.MustCompile("^00-"+trace+"-"+hexRE(16)+"-01$").MatchString(got) || strings.Contains(got, parent) {
			t.Errorf("propagated traceparent %q: want trace %s kept, a new span id, flags 01", got, trace)
		}
		for _, in := range []string{"", "garbage", "00-" + strings.Repeat("0", 32) + "-" + parent + "-01"} {
			h := map[string]string{}
			if in != "" {
				h["Traceparent"] = in
			}
			got := get(h).Get("Traceparent")
			if !regexp.MustCompile("^00-"+hexRE(32)+"-"+hexRE(16)+"-01$").MatchString(got) || strings.Contains(got, strings.Repeat("0", 32)) {
				t.Errorf("traceparent %q: started %q, want a new valid trace", in, got)
			}
		}
	})

	t.Run("counters are exact across threads and connections", func(t *testing.T) {
		before := scrape(t, admin)
		count := func(f map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
			mm := find(f[name], labels)
			if mm == nil {
				return 0
			}
			if h := mm.GetHistogram(); h != nil {
				return float64(h.GetSampleCount())
			}
			return mm.GetCounter().GetValue()
		}
		pair := map[string]string{"source": "web", "destination": "api"}
		ok2xx := map[string]string{"source": "web", "destination": "api", "code_class": "2xx"}
		denied := map[string]string{"source": "batch", "destination": "api", "reason": "intention_deny"}
		const conns, perConn, deniedN = 8, 125, 25
		var wg sync.WaitGroup
		errs := make(chan error, conns+1)
		for c := 0; c < conns; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cl := client(web) // its own keep-alive connection
				for i := 0; i < perConn; i++ {
					resp, err := cl.Get(inbound)
					if err != nil {
						errs <- err
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := client(batch)
			for i := 0; i < deniedN; i++ {
				resp, err := cl.Get(inbound)
				if err != nil {
					errs <- err
					return
				}
				resp.Body.Close()
			}
		}()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		after := scrape(t, admin)
		if d := count(after, "haconnect_requests_total", ok2xx) - count(before, "haconnect_requests_total", ok2xx); d != conns*perConn {
			t.Errorf("requests_total{web,api,2xx} grew by %v, want %d", d, conns*perConn)
		}
		if d := count(after, "haconnect_request_duration_seconds", pair) - count(before, "haconnect_request_duration_seconds", pair); d != conns*perConn {
			t.Errorf("request_duration_seconds count grew by %v, want %d", d, conns*perConn)
		}
		if d := count(after, "haconnect_denied_total", denied) - count(before, "haconnect_denied_total", denied); d != deniedN {
			t.Errorf("denied_total{batch,api,intention_deny} grew by %v, want %d", d, deniedN)
		}
		h := find(after["haconnect_request_duration_seconds"], pair).GetHistogram()
		last := uint64(0)
		for _, b := range h.GetBucket() {
			if b.GetCumulativeCount() < last {
				t.Errorf("bucket le=%v decreases", b.GetUpperBound())
			}
			last = b.GetCumulativeCount()
		}
		// The exact _sum must lie within what the buckets allow.
		lo, hi, prevBound, prevCum := 0.0, 0.0, 0.0, uint64(0)
		for _, b := range h.GetBucket() {
			n := float64(b.GetCumulativeCount() - prevCum)
			lo, hi = lo+n*prevBound, hi+n*b.GetUpperBound()
			prevBound, prevCum = b.GetUpperBound(), b.GetCumulativeCount()
		}
		if h.GetSampleCount() != prevCum { // beyond the last finite bucket
			t.Fatalf("%d requests slower than %vs in a test", h.GetSampleCount()-prevCum, prevBound)
		}
		if s := h.GetSampleSum(); s < lo || s > hi+1e-6 {
			t.Errorf("_sum %v outside the bucket bounds [%v, %v]", s, lo, hi)
		}
		mean := h.GetSampleSum() / float64(h.GetSampleCount())
		if mean <= 0 || mean > 1 {
			t.Errorf("mean latency %vs from _sum/_count is not plausible", mean)
		}
		if after["haproxy_process_nbthread"] == nil {
			t.Error("HAProxy's own exporter output is missing from /metrics")
		} else if n := after["haproxy_process_nbthread"].GetMetric()[0].GetGauge().GetValue(); n < 2 {
			t.Errorf("HAProxy runs %v threads; the exactness check needs several", n)
		}
		t.Logf("mean latency %.0fus over %d requests", mean*1e6, h.GetSampleCount())
	})

	// One scrape target: the admin listener also serves the sidecar
	// process's metrics, the embedded SPOA's decisions among them.
	t.Run("the process's metrics are served on the admin listener too", func(t *testing.T) {
		get(nil) // at least one decision, whichever subtests ran
		m := scrape(t, admin)
		for _, name := range []string{"haconnect_spoa_decisions_total", "haconnect_sidecar_applies_total", "go_goroutines"} {
			if m[name] == nil {
				t.Errorf("%s is missing from the admin listener's /metrics", name)
			}
		}
		allowed := 0.0
		for _, mm := range m["haconnect_spoa_decisions_total"].GetMetric() {
			for _, l := range mm.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == "allow" {
					allowed += mm.GetCounter().GetValue()
				}
			}
		}
		if allowed == 0 {
			t.Errorf("no allowed decision counted, after the requests above: %v", m["haconnect_spoa_decisions_total"])
		}
	})
}
