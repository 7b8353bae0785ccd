package e2e

import (
	"fmt"
	"math"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestChainHTTP follows api's discovery chain (Consul's service-resolver,
// -splitter and -router, compiled by Consul) from web's sidecar: api runs
// in two versions, v1 (two instances) and v2 (one), as subsets by
// Service.Meta.version. Each subtest writes the whole chain it needs and
// waits until web follows it.
func TestChainHTTP(t *testing.T) {
	m := newChainMesh(t)
	m.addVersion("api", "api-v1-1", "v1")
	m.addVersion("api", "api-v1-2", "v1")
	m.addVersion("api", "api-v2-1", "v2")
	web := m.add("web", "web-1", "api")
	// Without a chain of its own, api's default chain: every instance.
	for _, id := range []string{"api-v1-1", "api-v1-2", "api-v2-1"} {
		harness.WaitFor(t, 20*time.Second, "web reaches "+id, func() bool {
			return web.do(reuseClient(), "api", chainRequest{}).id == id
		})
	}
	onlyV1 := chainRequest{path: "/"}

	t.Run("an 80/20 split between two subsets is measured within 3 points over 2000 requests", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), nil, nil)
		waitAnswers(t, web, "api", 15*time.Second, "resolver default subset v1: 50 answers from v1", 50, onlyV1, from("api-v1-"))
		setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 80, "v2": 20}), nil)
		harness.WaitFor(t, 15*time.Second, "the split sends some requests to v2", func() bool {
			return count(web, "api", 50, 2, func(int) chainRequest { return onlyV1 }).share("api-v2-") > 0
		})
		// The split is applied by the time v2 answers; a moment more for
		// a change applied in steps (targets, then weights).
		time.Sleep(time.Second)
		c := count(web, "api", 2000, 4, func(int) chainRequest { return onlyV1 })
		c.noFailures(t, "split")
		v1, v2 := 100*c.share("api-v1-"), 100*c.share("api-v2-")
		t.Logf("80/20 split over 2000 keep-alive requests: v1 %.1f%%, v2 %.1f%% (%s)", v1, v2, c)
		if math.Abs(v1-80) > 3 || math.Abs(v2-20) > 3 {
			t.Errorf("split measured v1 %.1f%% / v2 %.1f%%, want 80/20 within 3 points", v1, v2)
		}
		if c.byID["api-v1-1"] == 0 || c.byID["api-v1-2"] == 0 {
			t.Errorf("v1's two instances do not both serve its share: %v", c.byID)
		}
	})

	headerRoute := api.ServiceRoute{
		Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{Header: []api.ServiceRouteHTTPMatchHeader{{Name: "x-version", Exact: "v2"}}}},
		Destination: &api.ServiceRouteDestination{ServiceSubset: "v2"},
	}
	withV2 := chainRequest{headers: map[string]string{"X-Version": "v2"}}

	t.Run("a header route sends 100% of its requests to subset v2, the rest to the default subset v1", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), nil, router("api", headerRoute))
		waitAnswers(t, web, "api", 15*time.Second, "x-version: v2 routed to v2", 20, withV2, from("api-v2-"))
		routed := count(web, "api", 500, 4, func(int) chainRequest { return withV2 })
		rest := count(web, "api", 500, 4, func(i int) chainRequest {
			// Near misses must not match: another value, the name as a value.
			return []chainRequest{onlyV1, {headers: map[string]string{"X-Version": "v1"}}, {headers: map[string]string{"X-Other": "v2"}}}[i%3]
		})
		t.Logf("x-version: v2 -> %s; others -> %s", routed, rest)
		routed.noFailures(t, "header route")
		rest.noFailures(t, "default route")
		if s := routed.share("api-v2-"); s != 1 {
			t.Errorf("x-version: v2 reached v2 for %.1f%% of requests, want 100%%", 100*s)
		}
		if s := rest.share("api-v1-"); s != 1 {
			t.Errorf("requests without x-version: v2 reached v1 for %.1f%%, want 100%%", 100*s)
		}
	})

	t.Run("a path route with a prefix rewrite: the app sees the rewritten path", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), nil, router("api", api.ServiceRoute{
			Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/v2api/"}},
			Destination: &api.ServiceRouteDestination{ServiceSubset: "v2", PrefixRewrite: "/"},
		}))
		r := chainRequest{path: "/v2api/items/7?q=a%2Fb&x=1"}
		waitAnswers(t, web, "api", 15*time.Second, "/v2api/ routed to v2", 10, r, from("api-v2-"))
		c := reuseClient()
		for i := 0; i < 20; i++ {
			a := web.do(c, "api", r)
			if !a.ok() || a.id != "api-v2-1" || a.uri != "/items/7?q=a%2Fb&x=1" {
				t.Fatalf("GET %s: %d %q %v; want api-v2-1 seeing /items/7?q=a%%2Fb&x=1", r.path, a.code, a.body, a.err)
			}
		}
		// Outside the prefix (also the prefix without its slash): v1, path as sent.
		for _, p := range []string{"/other/v2api/x", "/v2api"} {
			a := web.do(c, "api", chainRequest{path: p})
			if !a.ok() || !strings.HasPrefix(a.id, "api-v1-") || a.uri != p {
				t.Errorf("GET %s: %d %q %v; want v1 seeing %s unchanged", p, a.code, a.body, a.err, p)
			}
		}
		t.Logf("GET %s -> app saw %s", r.path, web.do(c, "api", r).uri)
	})

	t.Run("a route's request header modifier and request timeout", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), nil, router("api",
			api.ServiceRoute{
				Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/slow"}},
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v1", RequestTimeout: 500 * time.Millisecond},
			},
			api.ServiceRoute{
				Match: headerRoute.Match,
				Destination: &api.ServiceRouteDestination{ServiceSubset: "v2",
					RequestHeaders: &api.HTTPHeaderModifiers{Set: map[string]string{"X-User": "set-by-route"}}},
			}))
		r := chainRequest{headers: map[string]string{"X-Version": "v2", "X-User": "sent"}}
		waitAnswers(t, web, "api", 15*time.Second, "x-version: v2 routed to v2 with X-User set", 10, r, func(a answer) bool {
			return a.id == "api-v2-1" && strings.Contains(a.body, "x-user=set-by-route")
		})
		if a := web.do(reuseClient(), "api", chainRequest{headers: map[string]string{"X-User": "sent"}}); !a.ok() || !strings.Contains(a.body, "x-user=sent") {
			t.Errorf("the default route changed X-User: %d %q %v", a.code, a.body, a.err)
		}
		// Envoy's route timeout bounds the whole request, retries
		// included: a GET slower than it is a 504 after about 500ms.
		start := time.Now()
		a := web.do(reuseClient(), "api", chainRequest{path: "/slow?sleep=3s"})
		took := time.Since(start)
		t.Logf("GET /slow?sleep=3s with a 500ms route timeout: %d after %s", a.code, took.Round(time.Millisecond))
		if a.code != 504 || took < 400*time.Millisecond || took > 1500*time.Millisecond {
			t.Errorf("GET /slow?sleep=3s: %d %q %v after %s; want 504 after about 500ms", a.code, a.body, a.err, took)
		}
		// Without the route's timeout the same wait is served.
		start = time.Now()
		if a := web.do(reuseClient(), "api", chainRequest{path: "/other?sleep=1s"}); !a.ok() {
			t.Errorf("GET /other?sleep=1s: %d %q %v after %s, want 200", a.code, a.body, a.err, time.Since(start))
		}
	})

	t.Run("consistent hashing on header x-user: the same key lands on the same instance", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1", func(e *api.ServiceResolverConfigEntry) {
			e.LoadBalancer = &api.LoadBalancer{Policy: "ring_hash", HashPolicies: []api.HashPolicy{{Field: "header", FieldValue: "x-user"}}}
		}), nil, nil)
		key := func(k string) chainRequest { return chainRequest{headers: map[string]string{"X-User": k}} }
		// Round robin over v1's two instances would alternate.
		harness.WaitFor(t, 15*time.Second, "12 requests of one x-user on one instance", func() bool {
			c := count(web, "api", 12, 1, func(int) chainRequest { return key("probe") })
			return c.failed == 0 && len(c.byID) == 1
		})
		landed := map[string]map[string]int{}
		used := map[string]bool{}
		k, f := reuseClient(), freshClient()
		for round := 0; round < 10; round++ {
			for u := 0; u < 40; u++ {
				name := fmt.Sprintf("user-%d", u)
				client := k
				if round%2 == 1 {
					client = f // a new connection must land where the key does
				}
				a := web.do(client, "api", key(name))
				if !a.ok() {
					t.Fatalf("x-user %s: %d %q %v", name, a.code, a.body, a.err)
				}
				if landed[name] == nil {
					landed[name] = map[string]int{}
				}
				landed[name][a.id]++
				used[a.id] = true
			}
		}
		spread := 0
		for name, ids := range landed {
			if len(ids) != 1 {
				spread++
				t.Errorf("x-user %s landed on %d instances: %v", name, len(ids), ids)
			}
		}
		t.Logf("40 keys x 10 requests (keep-alive and new connections): instances used %v, keys on more than one instance: %d", used, spread)
		if len(used) < 2 {
			t.Errorf("40 keys all landed on %v: not hashing on the header", used)
		}
		for id := range used {
			if !strings.HasPrefix(id, "api-v1-") {
				t.Errorf("%s served the default subset v1", id)
			}
		}

		// A reload for another change (a route for other requests) keeps
		// every key on its instance: Envoy's ring is the same for the
		// same hosts, and users count on that affinity.
		logFrom := len(web.sidecar.Output())
		setEntry(t, m, router("api", headerRoute))
		waitAnswers(t, web, "api", 15*time.Second, "x-version: v2 routed to v2", 10, withV2, from("api-v2-"))
		var applied string
		harness.WaitFor(t, 5*time.Second, "web's sidecar logs the route applied", func() bool {
			applied = logLine(web.sidecar.Output()[logFrom:], "configuration applied")
			return applied != ""
		})
		t.Logf("the route: %s", strings.TrimSpace(applied))
		moved := 0
		for u := 0; u < 40; u++ {
			name := fmt.Sprintf("user-%d", u)
			a := web.do(k, "api", key(name))
			for id := range landed[name] {
				if a.id != id {
					moved++
					t.Errorf("after the reload x-user %s landed on %q (%d %v), before on %s", name, a.id, a.code, a.err, id)
				}
			}
		}
		t.Logf("after a reload: %d of 40 keys moved", moved)
	})

	t.Run("a weight change under load: zero failed requests, write-to-traffic latency", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 90, "v2": 10}), nil)
		harness.WaitFor(t, 15*time.Second, "90/10: v2 seen", func() bool {
			return count(web, "api", 50, 2, func(int) chainRequest { return onlyV1 }).share("api-v2-") > 0
		})
		time.Sleep(time.Second)
		l := startChainLoad(web, "api", 4, 30*time.Second, func(int) chainRequest { return onlyV1 })
		time.Sleep(time.Second)
		before := shareOf(l.since(time.Now().Add(-time.Second)), "api-v2-")
		logFrom := len(web.sidecar.Output())
		wrote := time.Now()
		setEntry(t, m, splitter("api", map[string]float32{"v1": 10, "v2": 90}))
		written := time.Since(wrote)
		// The new ratio is seen when a window of 100 consecutive answers
		// has v2 at 80% or more (90% expected, 10% before).
		var seen time.Duration
		harness.WaitFor(t, 15*time.Second, "v2 at 80% or more of 100 consecutive answers", func() bool {
			as := l.since(wrote)
			for i := 100; i <= len(as); i++ {
				if shareOf(as[i-100:i], "api-v2-") >= 0.8 {
					seen = as[i-1].at.Sub(wrote)
					return true
				}
			}
			return false
		})
		time.Sleep(2 * time.Second)
		after := l.since(time.Now().Add(-1500 * time.Millisecond))
		l.finish()
		t.Logf("weight change 90/10 -> 10/90 under load: write returned after %s, new ratio seen %s after the write began; v2 share %.1f%% before, %.1f%% after (%d answers); %s",
			written.Round(time.Microsecond), seen.Round(time.Millisecond), 100*before, 100*shareOf(after, "api-v2-"), len(after), l.tally)
		// How the change was applied (runtime API or reload), as web's
		// sidecar says.
		for _, line := range strings.Split(web.sidecar.Output()[logFrom:], "\n") {
			if strings.Contains(line, "configuration applied") {
				t.Logf("weight change: %s", strings.TrimSpace(line))
			}
		}
		l.noFailures(t, "load across the weight change")
		if s := shareOf(after, "api-v2-"); math.Abs(s-0.9) > 0.05 {
			t.Errorf("after the change v2 has %.1f%%, want 90 within 5 points", 100*s)
		}
	})

	t.Run("a split weight change goes through HAProxy's runtime API, not a reload", func(t *testing.T) {
		// The issue: runtime API where HAProxy 2.6 allows it (server
		// weights, maps), a hitless reload otherwise. Weights can change
		// at runtime in 2.6 (set weight, set map), so a reload for a
		// weight alone is a gap.
		setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 10, "v2": 90}), nil)
		harness.WaitFor(t, 15*time.Second, "10/90: v1 and v2 seen", func() bool {
			c := count(web, "api", 50, 2, func(int) chainRequest { return onlyV1 })
			return c.share("api-v2-") > 0.5 && c.share("api-v1-") > 0
		})
		time.Sleep(time.Second)
		logFrom := len(web.sidecar.Output())
		setEntry(t, m, splitter("api", map[string]float32{"v1": 30, "v2": 70}))
		applied := func() []string {
			var out []string
			for _, line := range strings.Split(web.sidecar.Output()[logFrom:], "\n") {
				if strings.Contains(line, "configuration applied") {
					out = append(out, strings.TrimSpace(line))
				}
			}
			return out
		}
		harness.WaitFor(t, 15*time.Second, "web's sidecar applies the new weights", func() bool { return len(applied()) > 0 })
		time.Sleep(500 * time.Millisecond)
		for _, line := range applied() {
			t.Logf("30/70: %s", line)
			if strings.Contains(line, "method=reload") {
				t.Errorf("a split weight change reloaded HAProxy: %s", line)
			}
		}
	})

	t.Run("a weight changed at runtime survives a later reload", func(t *testing.T) {
		// Weights set through the runtime API live in the running worker
		// only: a reload for another change (here a new route) must
		// start from the weights Consul has now, not from those of the
		// last reload.
		setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 10, "v2": 90}), nil)
		harness.WaitFor(t, 15*time.Second, "10/90 served", func() bool {
			return math.Abs(count(web, "api", 200, 4, func(int) chainRequest { return onlyV1 }).share("api-v2-")-0.9) < 0.07
		})
		setEntry(t, m, splitter("api", map[string]float32{"v1": 30, "v2": 70}))
		harness.WaitFor(t, 15*time.Second, "30/70 served", func() bool {
			return math.Abs(count(web, "api", 200, 4, func(int) chainRequest { return onlyV1 }).share("api-v2-")-0.7) < 0.07
		})
		logFrom := len(web.sidecar.Output())
		setEntry(t, m, router("api", headerRoute))
		harness.WaitFor(t, 15*time.Second, "the new route served", func() bool {
			return count(web, "api", 20, 1, func(int) chainRequest { return withV2 }).share("api-v2-") == 1 &&
				count(web, "api", 100, 2, func(int) chainRequest { return onlyV1 }).share("api-v1-") > 0
		})
		time.Sleep(500 * time.Millisecond)
		c := count(web, "api", 1000, 4, func(int) chainRequest { return onlyV1 })
		c.noFailures(t, "after the reload")
		reloaded := logLine(web.sidecar.Output()[logFrom:], "configuration applied", "method=reload")
		t.Logf("after the new route (%s): %s (v2 %.1f%%)", strings.TrimSpace(reloaded), c, 100*c.share("api-v2-"))
		if reloaded == "" {
			t.Log("the new route was applied without a reload: this subtest then shows nothing about reloads")
		}
		if s := c.share("api-v2-"); math.Abs(s-0.7) > 0.05 {
			t.Errorf("after a reload v2 has %.1f%% of the split, want 70 within 5 points (the weight written last)", 100*s)
		}
	})

	t.Run("a burst of chain writes under load (weights at runtime, routes by reload): zero failed requests, the last write served", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 50, "v2": 50}), nil)
		harness.WaitFor(t, 15*time.Second, "50/50 served", func() bool {
			return math.Abs(count(web, "api", 200, 4, func(int) chainRequest { return onlyV1 }).share("api-v2-")-0.5) < 0.1
		})
		l := startChainLoad(web, "api", 4, 30*time.Second, func(i int) chainRequest {
			if i%2 == 0 {
				return withV2
			}
			return onlyV1
		})
		logFrom := len(web.sidecar.Output())
		for i := 0; i < 20; i++ {
			w := float32(5 * (i%19 + 1))
			setEntry(t, m, splitter("api", map[string]float32{"v1": 100 - w, "v2": w}))
			if i%5 == 4 { // a route comes and goes: a reload
				if i%10 == 4 {
					setEntry(t, m, router("api", headerRoute))
				} else {
					setChain(t, m, "api", resolver("api", "v1"), splitter("api", map[string]float32{"v1": 100 - w, "v2": w}), nil)
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		// The last writes: 25/75 and the header route.
		setEntry(t, m, splitter("api", map[string]float32{"v1": 25, "v2": 75}))
		setEntry(t, m, router("api", headerRoute))
		time.Sleep(2 * time.Second)
		l.finish()
		applied := strings.Count(web.sidecar.Output()[logFrom:], "configuration applied")
		reloads := strings.Count(web.sidecar.Output()[logFrom:], "method=reload")
		t.Logf("22 writes under load: %d applies (%d reloads); %s", applied, reloads, l.tally)
		l.noFailures(t, "load across the burst")
		routed := count(web, "api", 200, 4, func(int) chainRequest { return withV2 })
		split := count(web, "api", 1000, 4, func(int) chainRequest { return onlyV1 })
		t.Logf("after the burst: x-version: v2 -> %s; split -> v2 %.1f%%", routed, 100*split.share("api-v2-"))
		if s := routed.share("api-v2-"); s != 1 {
			t.Errorf("after the burst x-version: v2 reached v2 for %.1f%%, want 100%%", 100*s)
		}
		if s := split.share("api-v2-"); math.Abs(s-0.75) > 0.05 {
			t.Errorf("after the burst the split gives v2 %.1f%%, want 75 within 5 points (the last write)", 100*s)
		}
	})

	t.Run("a router RetryOn cancelled is refused by name and the previous chain keeps serving", func(t *testing.T) {
		setChain(t, m, "api", resolver("api", "v1"), nil, router("api", headerRoute))
		// Both sides of the route: the split left by the subtest before
		// (10/90) would pass a check of x-version: v2 alone.
		harness.WaitFor(t, 15*time.Second, "x-version: v2 routed to v2, the rest to v1", func() bool {
			return count(web, "api", 20, 1, func(int) chainRequest { return withV2 }).share("api-v2-") == 1 &&
				count(web, "api", 20, 1, func(int) chainRequest { return onlyV1 }).share("api-v1-") == 1
		})
		newRoute := api.ServiceRoute{
			Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/new"}},
			Destination: &api.ServiceRouteDestination{ServiceSubset: "v2", NumRetries: 2, RetryOn: []string{"cancelled"}},
		}
		setEntry(t, m, router("api", headerRoute, newRoute))
		var line string
		harness.WaitFor(t, 15*time.Second, "web's sidecar logs the refused RetryOn cancelled", func() bool {
			line = logLine(web.sidecar.Output(), "RetryOn", "cancelled")
			return line != ""
		})
		t.Logf("refused: %s", line)
		// Give a wrong apply time to show, then the previous chain must
		// still be the one served: the header route, and /new on v1.
		time.Sleep(time.Second)
		routed := count(web, "api", 200, 4, func(int) chainRequest { return withV2 })
		newPath := count(web, "api", 200, 4, func(int) chainRequest { return chainRequest{path: "/new"} })
		routed.noFailures(t, "header route after the refusal")
		newPath.noFailures(t, "/new after the refusal")
		if s := routed.share("api-v2-"); s != 1 {
			t.Errorf("after the refusal x-version: v2 reached v2 for %.1f%%, want 100%% (the previous chain)", 100*s)
		}
		if s := newPath.share("api-v1-"); s != 1 {
			t.Errorf("after the refusal /new reached v1 for %.1f%%, want 100%% (the refused route must not apply)", 100*s)
		}
		// The same route without the setting is followed.
		newRoute.Destination.RetryOn = []string{"connect-failure"}
		setEntry(t, m, router("api", headerRoute, newRoute))
		waitAnswers(t, web, "api", 15*time.Second, "/new routed to v2 once the chain is valid", 20, chainRequest{path: "/new"}, from("api-v2-"))
	})
}

// TestChainFailover: api's resolver fails over to another service,
// api-backup, when api has no healthy instance; api's instances go down
// (maintenance: critical in Consul, still running) under a load of GETs,
// none of which may fail, come back, and are deregistered.
func TestChainFailover(t *testing.T) {
	m, v1, v2, _, l := failoverUnderLoad(t)
	if n := l.share("api-backup-"); n != 0 {
		t.Errorf("api-backup served %.1f%% while api was healthy", 100*n)
	}
	down := time.Now()
	m.maintenance(t, v1, true)
	m.maintenance(t, v2, true)
	harness.WaitFor(t, 20*time.Second, "200 consecutive answers from api-backup", func() bool {
		as := l.since(down)
		return len(as) >= 200 && shareOf(as[len(as)-200:], "api-backup-") == 1
	})
	var took time.Duration
	for _, a := range l.since(down) {
		if a.id == "api-backup-1" {
			took = a.at.Sub(down)
			break
		}
	}
	time.Sleep(time.Second)
	up := time.Now()
	m.maintenance(t, v1, false)
	m.maintenance(t, v2, false)
	harness.WaitFor(t, 20*time.Second, "200 consecutive answers from api again", func() bool {
		as := l.since(up)
		return len(as) >= 200 && shareOf(as[len(as)-200:], "api-v") == 1
	})
	var back time.Duration
	for _, a := range l.since(up) {
		if strings.HasPrefix(a.id, "api-v") {
			back = a.at.Sub(up)
			break
		}
	}
	// Then api's instances stop as Nomad stops an allocation: they are
	// deregistered (their sidecars' registrations go with them) while
	// their processes still run.
	gone := time.Now()
	failedBefore := failures(l.since(down))
	for _, in := range []*instance{v1, v2} {
		if err := m.consul.Client.Agent().ServiceDeregister(in.id); err != nil {
			t.Fatal(err)
		}
	}
	harness.WaitFor(t, 20*time.Second, "200 consecutive answers from api-backup after api's deregistration", func() bool {
		as := l.since(gone)
		return len(as) >= 200 && shareOf(as[len(as)-200:], "api-backup-") == 1
	})
	time.Sleep(500 * time.Millisecond)
	l.finish()
	failedGone := failures(l.since(gone))
	t.Logf("failover: first answer from api-backup %s after api went critical, back on api %s after it recovered; "+
		"%d failed while critical and back, %d failed across the deregistration; %s",
		took.Round(time.Millisecond), back.Round(time.Millisecond), failedBefore, failedGone, l.tally)
	l.noFailures(t, "GETs while api went down (critical, then deregistered) and came back")
}

// failures counts the answers that are not the app's 200.
func failures(as []answer) int {
	n := 0
	for _, a := range as {
		if !a.ok() {
			n++
		}
	}
	return n
}

// TestChainRedirect: api's resolver redirects to the service api-v3.
// Traffic reaches api-v3, and web expects api-v3's SPIFFE ID: an api-v3
// instance whose certificate names api (api's own sidecar registered as
// api-v3's proxy) must not be talked to.
func TestChainRedirect(t *testing.T) {
	m := newChainMesh(t)
	v1 := m.addVersion("api", "api-v1-1", "v1")
	m.addVersion("api-v3", "api-v3-1", "v3")
	web := m.add("web", "web-1", "api")
	harness.WaitFor(t, 20*time.Second, "web reaches api-v1-1", func() bool {
		return web.do(reuseClient(), "api", chainRequest{}).id == "api-v1-1"
	})
	setChain(t, m, "api", &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "api",
		Redirect: &api.ServiceResolverRedirect{Service: "api-v3"}}, nil, nil)
	waitAnswers(t, web, "api", 15*time.Second, "api redirected to api-v3", 20, chainRequest{}, from("api-v3-"))
	a := web.do(reuseClient(), "api", chainRequest{})
	t.Logf("redirect: web -> api answered by %s (%q)", a.id, a.body)
	if !strings.HasSuffix(a.body, "source=web") {
		t.Errorf("api-v3 saw %q, want the caller web", a.body)
	}

	// Only an impostor left for api-v3: api's sidecar, whose certificate
	// names api. A sidecar expecting the upstream's name (api) would
	// accept it and reach api-v1-1.
	if err := m.consul.Client.Agent().ServiceDeregister("api-v3-1"); err != nil {
		t.Fatal(err)
	}
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "impostor-api-v3-sidecar-proxy", Name: "api-v3-sidecar-proxy",
		Address: "127.0.0.1", Port: v1.port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api-v3", LocalServicePort: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 15*time.Second, "the impostor in the backend of web's api-v3 target", func() bool {
		for _, line := range strings.Split(web.admin(t, "show stat -1 4 -1"), "\n") {
			f := strings.Split(line, ",")
			if len(f) > 73 && strings.Contains(f[0], "api-v3") && strings.HasSuffix(f[73], fmt.Sprintf(":%d", v1.port)) &&
				!strings.HasPrefix(f[17], "MAINT") {
				return true
			}
		}
		return false
	})
	c := count(web, "api", 100, 2, func(int) chainRequest { return chainRequest{} })
	t.Logf("with only the impostor: %s, e.g. %v", c, c.errs)
	for id := range c.byID {
		t.Errorf("%s answered through an api-v3 instance whose certificate names api", id)
	}
}

// TestChainTCPFailover: a TCP upstream follows its resolver (as for
// Envoy only the resolver applies to TCP): new connections go to
// tcpapi-backup while tcpapi has no healthy instance, and back; then a
// redirect sends them all there.
func TestChainTCPFailover(t *testing.T) {
	m := newMesh(t)
	for _, s := range []string{"tcpapi", "tcpapi-backup"} {
		m.consul.SetProtocol(t, s, "tcp")
		m.consul.SetIntentions(t, s, harness.Source("web", allow), harness.Source("*", deny))
	}
	primary := m.addTCPVersion("tcpapi", "tcpapi-1")
	m.addTCPVersion("tcpapi-backup", "tcpapi-backup-1")
	web := m.add("web", "web-1", "tcpapi:tcp")
	setEntry(t, m, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "tcpapi",
		Failover: map[string]api.ServiceResolverFailover{"*": {Service: "tcpapi-backup"}}})
	who := func(want string) func() bool {
		return func() bool {
			id, err := web.tcpWho("tcpapi", "ping")
			return err == nil && id == want
		}
	}
	harness.WaitFor(t, 20*time.Second, "tcpapi-1 answers", who("tcpapi-1"))
	for i := 0; i < 20; i++ {
		if id, err := web.tcpWho("tcpapi", "ping"); err != nil || id != "tcpapi-1" {
			t.Fatalf("connection %d while tcpapi is healthy: %q %v", i, id, err)
		}
	}
	down := time.Now()
	m.maintenance(t, primary, true)
	harness.WaitFor(t, 20*time.Second, "tcpapi-backup-1 answers", who("tcpapi-backup-1"))
	took := time.Since(down)
	for i := 0; i < 20; i++ {
		if id, err := web.tcpWho("tcpapi", "ping"); err != nil || id != "tcpapi-backup-1" {
			t.Errorf("connection %d while tcpapi is down: %q %v, want tcpapi-backup-1", i, id, err)
		}
	}
	m.maintenance(t, primary, false)
	harness.WaitFor(t, 20*time.Second, "tcpapi-1 answers again", who("tcpapi-1"))
	t.Logf("TCP failover: tcpapi-backup answered %s after tcpapi went critical", took.Round(time.Millisecond))

	// A redirect, the resolver's other way to another service, with
	// tcpapi healthy.
	setEntry(t, m, &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "tcpapi",
		Redirect: &api.ServiceResolverRedirect{Service: "tcpapi-backup"}})
	harness.WaitFor(t, 20*time.Second, "tcpapi redirected to tcpapi-backup", who("tcpapi-backup-1"))
	for i := 0; i < 20; i++ {
		if id, err := web.tcpWho("tcpapi", "ping"); err != nil || id != "tcpapi-backup-1" {
			t.Errorf("connection %d after the redirect: %q %v, want tcpapi-backup-1", i, id, err)
		}
	}
}

// TestChainFailoverStopped: api's instances stop (their sidecars get
// SIGTERM) without leaving Consul's catalog first, under a load of GETs:
// traffic must reach api-backup once api has no healthy instance, from
// HAProxy's own view or Consul's health check (every second). The
// requests failed on the way are counted and logged (Envoy, too, fails
// requests to an upstream gone before its health says so); none may fail
// once api-backup serves.
func TestChainFailoverStopped(t *testing.T) {
	_, v1, v2, _, l := failoverUnderLoad(t)
	stopped := time.Now()
	for _, in := range []*instance{v1, v2} {
		if err := in.sidecar.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	harness.WaitFor(t, 20*time.Second, "200 consecutive answers from api-backup", func() bool {
		as := l.since(stopped)
		return len(as) >= 200 && shareOf(as[len(as)-200:], "api-backup-") == 1
	})
	serving := time.Now()
	time.Sleep(time.Second)
	l.finish()
	var first, last time.Time
	n := 0
	for _, a := range l.since(stopped) {
		if !a.ok() {
			if n == 0 {
				first = a.at
			}
			last = a.at
			n++
		}
	}
	window := "none"
	if n > 0 {
		window = fmt.Sprintf("from %s to %s after the stop", first.Sub(stopped).Round(time.Millisecond), last.Sub(stopped).Round(time.Millisecond))
	}
	t.Logf("stopped primary: api-backup steadily serving %s after the stop; %d failed requests (%s), e.g. %v; %s",
		serving.Sub(stopped).Round(time.Millisecond), n, window, l.errs, l.tally)
	// Requests already sent to the primary when it died cannot be retried
	// on the failover target (HAProxy retries within a backend): they
	// may fail. Any sent once api-backup serves must not.
	sentAfter := 0
	for _, a := range l.since(stopped) {
		if !a.ok() && a.sent.After(serving) {
			sentAfter++
		}
	}
	if sentAfter > 0 {
		t.Errorf("%d requests sent after api-backup was serving failed", sentAfter)
	}
}

// TestChainFailoverIdentity: the identity web expects follows the
// failover target too. api goes critical and api-backup's only instance
// is an impostor (api-v1-1's own sidecar, still running, whose
// certificate names api, registered as api-backup's proxy): a sidecar
// expecting the upstream's name would let api-v1-1 answer.
func TestChainFailoverIdentity(t *testing.T) {
	m := newChainMesh(t)
	v1 := m.addVersion("api", "api-v1-1", "v1")
	web := m.add("web", "web-1", "api")
	setChain(t, m, "api", resolver("api", "", failoverToBackup), nil, nil)
	harness.WaitFor(t, 20*time.Second, "web reaches api-v1-1", func() bool {
		return web.do(reuseClient(), "api", chainRequest{}).id == "api-v1-1"
	})
	err := m.consul.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "impostor-api-backup-sidecar-proxy", Name: "api-backup-sidecar-proxy",
		Address: "127.0.0.1", Port: v1.port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api-backup", LocalServicePort: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	m.maintenance(t, v1, true)
	harness.WaitFor(t, 15*time.Second, "api-v1-1 out and the impostor in web's api-backup target", func() bool {
		in, out := false, true
		for _, line := range strings.Split(web.admin(t, "show stat -1 4 -1"), "\n") {
			f := strings.Split(line, ",")
			if len(f) <= 73 || !strings.HasSuffix(f[73], fmt.Sprintf(":%d", v1.port)) || strings.HasPrefix(f[17], "MAINT") {
				continue
			}
			if strings.Contains(f[0], "api-backup") {
				in = true
			} else {
				out = false
			}
		}
		return in && out
	})
	c := count(web, "api", 100, 2, func(int) chainRequest { return chainRequest{} })
	t.Logf("failover to an impostor: %s, e.g. %v", c, c.errs)
	for id := range c.byID {
		t.Errorf("%s answered through an api-backup instance whose certificate names api", id)
	}
}

// TestChainRefusedFromTheStart: a chain haconnect cannot honour when
// web's sidecar starts leaves no previous chain to keep: the upstream
// serves nothing (fail closed, never the service's instances without
// the chain) and the log names the setting; the chain, once fixed, is
// followed.
func TestChainRefusedFromTheStart(t *testing.T) {
	m := newChainMesh(t)
	m.addVersion("api", "api-v1-1", "v1")
	m.addVersion("api", "api-v2-1", "v2")
	setChain(t, m, "api", resolver("api", "v1"), nil, router("api", api.ServiceRoute{
		Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/"}},
		Destination: &api.ServiceRouteDestination{ServiceSubset: "v2", RetryOn: []string{"cancelled"}},
	}))
	web := m.add("web", "web-1", "api")
	var line string
	harness.WaitFor(t, 15*time.Second, "web's sidecar logs the refused RetryOn cancelled", func() bool {
		line = logLine(web.sidecar.Output(), "RetryOn", "cancelled")
		return line != ""
	})
	t.Logf("refused: %s", line)
	time.Sleep(time.Second)
	c := count(web, "api", 50, 2, func(int) chainRequest { return chainRequest{} })
	t.Logf("with the chain refused from the start: %s, e.g. %v", c, c.errs)
	for id := range c.byID {
		t.Errorf("%s answered through a refused chain", id)
	}
	setEntry(t, m, router("api", api.ServiceRoute{
		Match:       &api.ServiceRouteMatch{HTTP: &api.ServiceRouteHTTPMatch{PathPrefix: "/"}},
		Destination: &api.ServiceRouteDestination{ServiceSubset: "v2", RetryOn: []string{"connect-failure"}},
	}))
	waitAnswers(t, web, "api", 20*time.Second, "the fixed chain followed: v2", 20, chainRequest{}, from("api-v2-"))
}

// failoverToBackup makes api's resolver fail over to api-backup.
func failoverToBackup(e *api.ServiceResolverConfigEntry) {
	e.Failover = map[string]api.ServiceResolverFailover{"*": {Service: "api-backup"}}
}

// failoverUnderLoad starts what TestChainFailover and
// TestChainFailoverStopped share: api (v1 and v2) failing over to
// api-backup, web reaching both api instances, and a load of GETs through
// web that has run for a second.
func failoverUnderLoad(t *testing.T) (m *mesh, v1, v2, web *instance, l *chainLoad) {
	t.Helper()
	m = newChainMesh(t)
	v1 = m.addVersion("api", "api-v1-1", "v1")
	v2 = m.addVersion("api", "api-v2-1", "v2")
	m.addVersion("api-backup", "api-backup-1", "")
	web = m.add("web", "web-1", "api")
	setChain(t, m, "api", resolver("api", "", failoverToBackup), nil, nil)
	for _, id := range []string{"api-v1-1", "api-v2-1"} {
		harness.WaitFor(t, 20*time.Second, "web reaches "+id, func() bool {
			return web.do(reuseClient(), "api", chainRequest{}).id == id
		})
	}
	// The failover target must be usable in web's HAProxy before api goes
	// down: on a loaded machine its instance turns passing in Consul (its
	// first check) later than api's.
	harness.WaitFor(t, 20*time.Second, "api-backup's server up in web's HAProxy", func() bool {
		for _, line := range strings.Split(web.admin(t, "show stat -1 4 -1"), "\n") {
			if f := strings.Split(line, ","); len(f) > 17 && f[0] == "upstream_api::api-backup.default.default.dc1" && f[17] == "UP" {
				return true
			}
		}
		return false
	})
	l = startChainLoad(web, "api", 4, 60*time.Second, func(int) chainRequest { return chainRequest{} })
	time.Sleep(time.Second)
	return m, v1, v2, web, l
}
