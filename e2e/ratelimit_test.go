package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// rateTally counts the answers of a burst of requests.
type rateTally struct {
	mu      sync.Mutex
	ok      int
	limited int
	bodies  map[string]int // 429 bodies
	other   []string
}

func (r *rateTally) add(code int, body string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case err != nil:
		r.other = append(r.other, err.Error())
	case code == 200:
		r.ok++
	case code == 429:
		r.limited++
		if r.bodies == nil {
			r.bodies = map[string]int{}
		}
		r.bodies[body]++
	default:
		r.other = append(r.other, fmt.Sprintf("%d %q", code, body))
	}
}

// burst sends n GETs of path to url as fast as workers keep-alive
// connections can.
func burst(client *http.Client, url string, n, workers int) *rateTally {
	tally := &rateTally{}
	jobs := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				resp, err := client.Get(url)
				if err != nil {
					tally.add(0, "", err)
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				tally.add(resp.StatusCode, string(b), nil)
			}
		}()
	}
	wg.Wait()
	return tally
}

// TestRateLimits: Proxy.Config rate_limits through real Consul and
// HAProxy (two threads), callers with their own certificates.
func TestRateLimits(t *testing.T) {
	m := newMesh(t)
	for _, dest := range []string{"api", "orders", "rpc", "db"} {
		m.consul.SetIntentions(t, dest, harness.Source("web", allow), harness.Source("batch", allow))
	}
	roots, _ := m.consul.RootsPEM(t)
	web, batch := m.consul.IssueLeaf(t, "web"), m.consul.IssueLeaf(t, "batch")
	client := func(leaf *harness.Leaf) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			TLSClientConfig: harness.ClientTLS(leaf, roots), MaxIdleConnsPerHost: 16}}
	}
	webClient, batchClient := client(web), client(batch)
	admins := map[string]string{} // instance id -> admin listener
	withLimits := func(id, limits string) *instance {
		admins[id] = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
		in := &instance{id: id, args: []string{"-admin-bind", admins[id], "-threads", "2"}}
		if limits != "" {
			in.config = map[string]any{"rate_limits": decodeJSON(t, limits)}
		}
		return in
	}
	limited := func(in *instance, source, scope string) int {
		t.Helper()
		f := find(scrape(t, admins[in.id])["haconnect_rate_limited_total"], map[string]string{"source": source, "destination": strings.TrimSuffix(in.id, "-1"), "scope": scope})
		return int(f.GetCounter().GetValue())
	}

	apiIn := m.addInstance(withLimits("api-1", `{
		"per_source": {"web": {"requests_per_second": 10, "requests_max_burst": 10}},
		"routes": [{"path_prefix": "/expensive", "requests_per_second": 2, "requests_max_burst": 2}]}`), "api")
	apiURL := fmt.Sprintf("https://127.0.0.1:%d", apiIn.port)

	t.Run("web over its budget gets 429 while batch is served", func(t *testing.T) {
		var webTally, batchTally *rateTally
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); webTally = burst(webClient, apiURL+"/", 100, 8) }()
		go func() { defer wg.Done(); batchTally = burst(batchClient, apiURL+"/", 100, 8) }()
		wg.Wait()
		t.Logf("web: %d passed, %d limited; batch: %d passed, %d limited", webTally.ok, webTally.limited, batchTally.ok, batchTally.limited)
		if webTally.ok < 10 || webTally.ok > 20 || webTally.ok+webTally.limited != 100 || len(webTally.other) > 0 {
			t.Errorf("web: %d passed, %d limited, other %v; want 10-20 passed, the rest 429", webTally.ok, webTally.limited, webTally.other)
		}
		if batchTally.ok != 100 {
			t.Errorf("batch (no budget): %d of 100 passed, other %v", batchTally.ok, batchTally.other)
		}
		if want := "haconnect: rate limited (source)\n"; webTally.bodies[want] != webTally.limited {
			t.Errorf("429 bodies %v, want every one %q", webTally.bodies, want)
		}
		// Exact across threads: the metric counts what the client saw.
		if got := limited(apiIn, "web", "source"); got != webTally.limited {
			t.Errorf("haconnect_rate_limited_total{web,api,source} = %d, the client saw %d", got, webTally.limited)
		}
	})

	t.Run("a route's budget applies to its paths only, normalized", func(t *testing.T) {
		before := limited(apiIn, "batch", "route path_prefix /expensive")
		tally := burst(batchClient, apiURL+"/expensive/report", 10, 1)
		if tally.ok != 2 || tally.limited != 8 {
			t.Errorf("/expensive/report: %d passed, %d limited, other %v; want 2 and 8", tally.ok, tally.limited, tally.other)
		}
		// The same path spelled otherwise is the same route.
		spelled := burst(batchClient, apiURL+"/%65xpensive/report", 5, 1)
		if spelled.ok != 0 || spelled.limited != 5 {
			t.Errorf("/%%65xpensive/report: %d passed, %d limited, other %v; want all limited", spelled.ok, spelled.limited, spelled.other)
		}
		if want := "haconnect: rate limited (route path_prefix /expensive)\n"; tally.bodies[want] != tally.limited {
			t.Errorf("429 bodies %v, want %q", tally.bodies, want)
		}
		other := burst(batchClient, apiURL+"/cheap", 20, 4)
		if other.ok != 20 {
			t.Errorf("/cheap: %d of 20 passed (%v)", other.ok, other.other)
		}
		if got := limited(apiIn, "batch", "route path_prefix /expensive") - before; got != tally.limited+spelled.limited {
			t.Errorf("route scope counted %d, the client saw %d", got, tally.limited+spelled.limited)
		}
	})

	t.Run("gRPC callers over budget get RESOURCE_EXHAUSTED", func(t *testing.T) {
		port, _ := grpcApp(t)
		rpcIn := m.register(withLimits("rpc-1", `{"per_source": {"web": {"requests_per_second": 2, "requests_max_burst": 3}}}`), "rpc", "grpc", port)
		cc, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", rpcIn.port), grpc.WithTransportCredentials(credentials.NewTLS(harness.ClientTLS(web, roots))))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		hc := healthpb.NewHealthClient(cc)
		codesSeen := map[codes.Code]int{}
		var msg string
		for i := 0; i < 10; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
			cancel()
			s := status.Convert(err)
			codesSeen[s.Code()]++
			if s.Code() == codes.ResourceExhausted {
				msg = s.Message()
			}
		}
		if codesSeen[codes.OK] != 3 || codesSeen[codes.ResourceExhausted] != 7 {
			t.Errorf("codes %v, want 3 OK and 7 ResourceExhausted", codesSeen)
		}
		if msg != "haconnect: rate limited (source)" {
			t.Errorf("grpc-message %q", msg)
		}
		if got := limited(rpcIn, "web", "source"); got != 7 {
			t.Errorf("haconnect_rate_limited_total{web,rpc,source} = %d, want 7", got)
		}
	})

	t.Run("a TCP service limits each caller's new connections", func(t *testing.T) {
		dbIn := m.register(withLimits("db-1", `{"connections_per_second": 3}`), "db", "tcp", startEcho(t))
		var ok, refused int
		for i := 0; i < 10; i++ {
			if echoTLS(t, dbIn.port, web, roots, "hello") == nil {
				ok++
			} else {
				refused++
			}
		}
		// Ten connections in well under a second, at most one admitted
		// beyond the budget per thread at its edge.
		if ok < 3 || ok > 5 {
			t.Errorf("%d of 10 connections served, want 3 (the budget)", ok)
		}
		if got := limited(dbIn, "web", "connections"); got != refused {
			t.Errorf("haconnect_rate_limited_total{web,db,connections} = %d, %d refused", got, refused)
		}
		if echoTLS(t, dbIn.port, batch, roots, "hello") != nil {
			t.Error("batch's first connection was refused: the budget is per caller")
		}
	})

	t.Run("an HTTP service limits each caller's new connections", func(t *testing.T) {
		m.consul.SetIntentions(t, "conns", harness.Source("web", allow))
		connsIn := m.addInstance(withLimits("conns-1", `{"connections_per_second": 2}`), "conns")
		var ok, refused int
		for i := 0; i < 6; i++ {
			// A new connection each time; its second request shares its fate.
			c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: harness.ClientTLS(web, roots)}}
			tally := burst(c, fmt.Sprintf("https://127.0.0.1:%d/", connsIn.port), 2, 1)
			c.CloseIdleConnections()
			switch {
			case tally.ok == 2:
				ok++
			case tally.limited >= 1 && tally.bodies["haconnect: rate limited (connections)\n"] == tally.limited:
				refused++
			default:
				t.Errorf("connection %d: %+v", i, tally)
			}
		}
		if ok < 2 || ok > 3 || ok+refused != 6 {
			t.Errorf("%d of 6 connections served, %d refused; want 2 (the budget)", ok, refused)
		}
	})

	t.Run("proxy-defaults apply live; an invalid value is refused and the old limits kept", func(t *testing.T) {
		ordersIn := m.addInstance(withLimits("orders-1", ""), "orders")
		ordersURL := fmt.Sprintf("https://127.0.0.1:%d/", ordersIn.port)
		setDefaults := func(limits string) {
			t.Helper()
			entry := &api.ProxyConfigEntry{Kind: api.ProxyDefaults, Name: api.ProxyConfigGlobal,
				Config: map[string]any{"rate_limits": decodeJSON(t, limits)}}
			if ok, _, err := m.consul.Client.ConfigEntries().Set(entry, nil); err != nil || !ok {
				t.Fatalf("proxy-defaults: %v", err)
			}
		}
		defer func() { _, _ = m.consul.Client.ConfigEntries().Delete(api.ProxyDefaults, api.ProxyConfigGlobal, nil) }()
		if tally := burst(webClient, ordersURL, 30, 4); tally.ok != 30 {
			t.Fatalf("before any limit: %d of 30 passed", tally.ok)
		}
		setDefaults(`{"per_source": {"*": {"requests_per_second": 0.5, "requests_max_burst": 5}}}`)
		harness.WaitFor(t, 10*time.Second, "the proxy-defaults budget on orders", func() bool {
			return burst(webClient, ordersURL, 10, 1).limited > 0
		})
		// A new number in the same window (10 s): applied through the
		// runtime API, no reload.
		reloads := strings.Count(ordersIn.sidecar.Output(), "haproxy reloaded")
		setDefaults(`{"per_source": {"*": {"requests_per_second": 0.1, "requests_max_burst": 1}}}`)
		harness.WaitFor(t, 10*time.Second, "batch limited to 1 in 10 s", func() bool {
			tally := burst(batchClient, ordersURL, 5, 1)
			return tally.limited >= 4
		})
		if n := strings.Count(ordersIn.sidecar.Output(), "haproxy reloaded"); n != reloads {
			t.Errorf("a budget in the same window reloaded HAProxy (%d reloads, was %d)", n, reloads)
		}
		setDefaults(`{"per_source": {"*": {"requests_per_second": 10, "requests_max_burst": 2}}}`)
		harness.WaitFor(t, 10*time.Second, "the refusal logged by field", func() bool {
			return strings.Contains(ordersIn.sidecar.Output(), "Proxy.Config.rate_limits.per_source.*: requests_max_burst 2 is less than requests_per_second 10")
		})
		// The old budget (1 in 10 s) still holds for a caller not seen yet.
		fresh := client(m.consul.IssueLeaf(t, "fresh"))
		m.consul.SetIntentions(t, "orders", harness.Source("web", allow), harness.Source("batch", allow), harness.Source("fresh", allow))
		harness.WaitFor(t, 10*time.Second, "fresh allowed", func() bool {
			resp, err := fresh.Get(ordersURL)
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200 || resp.StatusCode == 429
		})
		if tally := burst(fresh, ordersURL, 5, 1); tally.ok != 0 || tally.limited != 5 {
			t.Errorf("after the invalid value: fresh %d passed, %d limited; want the old budget (1 in 10 s, spent)", tally.ok, tally.limited)
		}
	})
}

func decodeJSON(t *testing.T, js string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(js), &v); err != nil {
		t.Fatalf("%s: %v", js, err)
	}
	return v
}

// echoTLS sends a line over mTLS straight to a TCP sidecar's inbound and
// reads it back; an error when the connection was refused.
func echoTLS(t *testing.T, port int, leaf *harness.Leaf, roots, line string) error {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", port), harness.ClientTLS(leaf, roots))
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, line); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != line {
		return fmt.Errorf("echo %q", got)
	}
	return nil
}
