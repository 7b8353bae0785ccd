//go:build cluster

// More fault scenarios on the real Consul cluster (cluster_test.go has the
// two that run in `make test`). Together they take longer than CI's budget
// on two cores: `make test-cluster` runs them all (build tag cluster).

package e2e

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// clusterSidecars are the sidecars' compose services: none may restart.
var clusterSidecars = []string{"web-sidecar", "api-1-sidecar", "api-2-sidecar"}

func (c *cluster) sidecarStarts() map[string]string {
	m := map[string]string{}
	for _, s := range clusterSidecars {
		m[s] = c.startedAt(s)
	}
	return m
}

func (c *cluster) noSidecarRestarted(t *testing.T, before map[string]string) {
	t.Helper()
	for s, at := range c.sidecarStarts() {
		if at != before[s] {
			t.Errorf("%s was restarted (started %s, then %s)", s, before[s], at)
		}
	}
}

// TestClusterAllServersDown: the three servers stop under load. The
// agents keep answering what they cached (CA roots, leaves, instances),
// and the api sidecars serve their cached callers (web, probe) for the
// stale window, counted from Consul's last answer about api's
// intentions; past it every caller is denied (403 consul_stale), on open
// connections too. The servers come back with their Raft data (the same CA
// and trust domain): a leader is elected and every caller is served again,
// with no sidecar restarted.
func TestClusterAllServersDown(t *testing.T) {
	const window = 20 * time.Second
	c := startCluster(t, window)
	starts := c.sidecarStarts()
	before, _, err := c.agent("web").Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	load := c.startLoad(4*time.Minute, streams("api-1", "api-2"))
	time.Sleep(3 * time.Second)

	cut := time.Now()
	c.stop(clusterServers...)
	t.Logf("stopped the three servers in %v", time.Since(cut).Round(10*time.Millisecond))
	failed := func(a answer) bool { return !a.ok() }
	firstFailure := func(after time.Time) (answer, bool) {
		for _, a := range load.answers("") {
			if a.sent.After(after) && failed(a) {
				return a, true
			}
		}
		return answer{}, false
	}
	denied := waitUntil(window+30*time.Second, func() bool { _, ok := firstFailure(cut); return ok })
	if denied.IsZero() {
		t.Fatalf("callers still served %v after the servers stopped (stale window %v)", time.Since(cut), window)
	}
	first, _ := firstFailure(cut)
	// Denied for good: a second in which every request failed. Each api
	// sidecar counts its window from its own last answer from Consul, so
	// the two may start denying a few seconds apart.
	deniedAll := waitUntil(30*time.Second, func() bool { return lastSecond(load, failed) })
	if deniedAll.IsZero() {
		t.Fatalf("callers still served %v after the servers stopped (stale window %v)", time.Since(cut), window)
	}
	time.Sleep(2 * time.Second)
	var late, lateOK int
	for _, a := range load.answers("") {
		if a.sent.After(deniedAll) {
			late++
			if a.ok() {
				lateOK++
			}
		}
	}

	restart := time.Now()
	for _, s := range clusterServers {
		c.start(s)
	}
	elected := waitUntil(120*time.Second, func() bool { return c.leader() != "" })
	// Recovered: a second in which every request succeeded.
	recovered := waitUntil(120*time.Second, func() bool { return lastSecond(load, answer.ok) })
	time.Sleep(5 * time.Second)
	load.finish()

	var lastFailure time.Time
	for _, a := range load.answers("") {
		if failed(a) && a.at.After(lastFailure) {
			lastFailure = a.at
		}
	}
	t.Logf("FIGURES all servers down | stale window %v | first denial (%s) for a request sent %s after the stop, every request denied from %s | %d of %d requests sent after that and before the restart served",
		window, failureKind(first), since(cut, first.sent), since(cut, deniedAll), lateOK, late)
	t.Logf("FIGURES all servers down | servers restarted: leader %s, every request served again %s, last failure %s after the restart",
		since(restart, elected), since(restart, recovered), since(restart, lastFailure))
	kinds := load.figures(t, "all servers down")
	spans := map[string][2]time.Time{}
	for _, a := range load.answers("") {
		if k := failureKind(a); k != "" {
			sp, ok := spans[k]
			if !ok || a.sent.Before(sp[0]) {
				sp[0] = a.sent
			}
			if a.sent.After(sp[1]) {
				sp[1] = a.sent
			}
			spans[k] = sp
		}
	}
	for k, sp := range spans {
		t.Logf("FIGURES all servers down | %s for requests sent from %s to %s after the stop (the restart %s after it)",
			k, since(cut, sp[0]), since(cut, sp[1]), since(cut, restart))
	}

	// The window counts from Consul's last answer about api's intentions,
	// which may come up to one blocking wait (a quarter of the window)
	// before the stop.
	if first.sent.Before(cut.Add(window - window/4 - time.Second)) {
		t.Errorf("a cached caller denied for a request sent %v after the servers stopped, within the stale window %v (%s)",
			first.sent.Sub(cut), window, failureKind(first))
	}
	if lateOK > 0 {
		t.Errorf("%d of %d requests served past the stale window", lateOK, late)
	}
	if deniedAll.After(cut.Add(window + 10*time.Second)) {
		t.Errorf("callers served until %v after the servers stopped, past the stale window %v", deniedAll.Sub(cut), window)
	}
	// Every failure is a denial for want of Consul: consul_stale past the
	// window, or consul_unavailable for the moment, as the servers come
	// back, when another of the destination's watches has answered again
	// (its cached decisions are then decided anew) but not yet its
	// intentions.
	for name, k := range kinds {
		for kind := range k {
			if kind != "403 consul_stale" && kind != "403 consul_unavailable" {
				t.Errorf("%s: %d requests failed with %s, want only 403 consul_stale (or consul_unavailable)", name, k[kind], kind)
			}
		}
	}
	if elected.IsZero() || recovered.IsZero() {
		t.Errorf("no recovery after the servers came back (leader: %v, served: %v)", !elected.IsZero(), !recovered.IsZero())
	}
	for _, a := range load.answers("") {
		if failed(a) && a.sent.After(recovered) {
			t.Errorf("a request sent after the recovery failed: %s", failureKind(a))
			break
		}
	}
	c.noSidecarRestarted(t, starts)
	// While the servers were gone the agents answered the CA roots from
	// their cache but failed every blocking query: the sidecars' watches
	// back off instead of retrying (and logging) every 100ms.
	for _, s := range clusterSidecars {
		if n := strings.Count(c.logs(s), "consul query failing"); n > 40 {
			t.Errorf("%s logged %d failing Consul queries while the servers were down for %v", s, n, restart.Sub(cut).Round(time.Second))
		} else {
			t.Logf("%s logged %d failing Consul queries while the servers were down for %v", s, n, restart.Sub(cut).Round(time.Second))
		}
	}
	// The servers kept their Raft data: the same CA and trust domain.
	after, _, err := c.agent("web").Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	if after.TrustDomain != before.TrustDomain || after.ActiveRootID != before.ActiveRootID {
		t.Errorf("the CA changed across the servers' restart: trust domain %s -> %s, active root %s -> %s",
			before.TrustDomain, after.TrustDomain, before.ActiveRootID, after.ActiveRootID)
	}
}

// lastSecond reports whether the requests of the last second that ended at
// least half a second ago (none still in flight) all satisfy want, and
// there were some.
func lastSecond(load *clusterLoad, want func(answer) bool) bool {
	n := 0
	now := time.Now()
	for _, a := range load.answers("") {
		if a.sent.After(now.Add(-1500*time.Millisecond)) && a.at.Before(now.Add(-500*time.Millisecond)) {
			if !want(a) {
				return false
			}
			n++
		}
	}
	return n > 0
}

// TestClusterAgentRestart: the Consul agent under a sidecar restarts (it
// leaves the cluster on SIGTERM and joins again, with a new leaf for its
// services). The sidecar keeps HAProxy serving what it has, then resumes
// its watches: web's follows api's instances again (an instance put in
// maintenance leaves its pool), api-1's follows api's intentions again (a
// changed intention is enforced). Zero failed requests.
func TestClusterAgentRestart(t *testing.T) {
	c := startCluster(t, 5*time.Minute)
	starts := c.sidecarStarts()
	load := c.startLoad(4*time.Minute, streams("api-1", "api-2"))
	time.Sleep(3 * time.Second)

	// web's agent, under the caller's sidecar.
	r1 := time.Now()
	c.restart("web-agent")
	up1 := waitUntil(60*time.Second, func() bool { _, err := c.agent("web").Agent().Self(); return err == nil })
	m := time.Now()
	if err := c.agent("api-2").Agent().EnableServiceMaintenance("api-2-sidecar-proxy", "cluster test"); err != nil {
		t.Fatal(err)
	}
	out := waitUntil(60*time.Second, func() bool { return c.upInPool() == 1 })
	if err := c.agent("api-2").Agent().DisableServiceMaintenance("api-2-sidecar-proxy"); err != nil {
		t.Fatal(err)
	}
	in := waitUntil(60*time.Second, func() bool { return c.upInPool() == 2 })
	t.Logf("FIGURES agent restart | web's agent answering %s after the restart began | then api-2 in maintenance left web's pool %s after, back %s after the maintenance ended",
		since(r1, up1), since(m, out), since(m, in))
	if out.IsZero() || in.IsZero() {
		t.Errorf("web's sidecar did not follow api's instances after its agent restarted (out: %v, back: %v)", !out.IsZero(), !in.IsZero())
	}

	// api-1's agent, under a destination's sidecar.
	r2 := time.Now()
	c.restart("api-1-agent")
	up2 := waitUntil(60*time.Second, func() bool { _, err := c.agent("api-1").Agent().Self(); return err == nil })
	w := time.Now()
	c.setIntentions(t, api.IntentionActionDeny)
	enforced := waitUntil(60*time.Second, func() bool { return c.inbound("api-1", c.flip).code == 403 })
	pooled := waitUntil(60*time.Second, func() bool { return c.upInPool() == 2 })
	t.Logf("FIGURES agent restart | api-1's agent answering %s after the restart began | then an intention change enforced at api-1 %s after the write | api-1 back in web's pool %s after the restart began",
		since(r2, up2), since(w, enforced), since(r2, pooled))
	if enforced.IsZero() {
		t.Errorf("api-1's sidecar did not follow api's intentions after its agent restarted")
	}
	// The agent gave api-1 a new leaf: served with the listener's options.
	for _, node := range []string{"web", "api-1"} {
		if !c.requiresClientCert(node) {
			t.Errorf("%s's sidecar takes callers without a client certificate after its agent restarted", node)
		}
	}
	c.setIntentions(t, api.IntentionActionAllow)
	time.Sleep(3 * time.Second)
	load.finish()
	load.figures(t, "agent restart")
	load.noFailures(t, "agent restart")
	c.noSidecarRestarted(t, starts)
}

// TestClusterCARotation: the Connect CA gets a new root key under load.
// Consul re-issues every leaf; each node's sidecar serves its new leaf
// (signed by the new root) and trusts the new roots, with zero failed
// requests on every node: web's calls to api-1 and api-2, and probe's new
// mTLS connections to each of them.
func TestClusterCARotation(t *testing.T) {
	c := startCluster(t, 5*time.Minute)
	starts := c.sidecarStarts()
	load := c.startLoad(4*time.Minute, streams("api-1", "api-2"))
	time.Sleep(3 * time.Second)

	srv := c.server(c.leader())
	conf, _, err := srv.Connect().CAGetConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	conf.Config["PrivateKey"] = newRootKey(t)
	conf.Config["RootCert"] = ""
	rotated := time.Now()
	if _, err := srv.Connect().CASetConfig(conf, nil); err != nil {
		t.Fatalf("rotate the CA: %v", err)
	}
	roots, _, err := srv.Connect().CARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	var newRoot *x509.Certificate
	for _, r := range roots.Roots {
		if r.Active {
			block, _ := pem.Decode([]byte(r.RootCertPEM))
			if newRoot, err = x509.ParseCertificate(block.Bytes); err != nil {
				t.Fatal(err)
			}
		}
	}
	served := map[string]time.Time{}
	nodes := []string{"web", "api-1", "api-2"}
	waitUntil(120*time.Second, func() bool {
		for _, node := range nodes {
			if served[node].IsZero() {
				if leaf, err := c.servedLeaf(node); err == nil && bytes.Equal(leaf.AuthorityKeyId, newRoot.SubjectKeyId) {
					served[node] = time.Now()
				}
			}
		}
		return len(served) == len(nodes)
	})
	for _, node := range nodes {
		if served[node].IsZero() {
			t.Errorf("%s's sidecar does not serve a leaf of the new root 120s after the rotation", node)
		} else if !c.requiresClientCert(node) {
			t.Errorf("%s's sidecar takes callers without a client certificate after the rotation", node)
		}
	}
	t.Logf("FIGURES CA rotation | new leaf served by web %s, api-1 %s, api-2 %s after the rotation",
		since(rotated, served["web"]), since(rotated, served["api-1"]), since(rotated, served["api-2"]))
	time.Sleep(5 * time.Second)
	load.finish()
	load.figures(t, "CA rotation")
	load.noFailures(t, "CA rotation")
	last := rotated
	for _, at := range served {
		if at.After(last) {
			last = at
		}
	}
	after := map[string]int{}
	for _, a := range load.answers("GET keep-alive") {
		if a.ok() && a.sent.After(last) {
			after[a.id]++
		}
	}
	if after["api-1"] == 0 || after["api-2"] == 0 {
		t.Errorf("web's calls after every node rotated, by instance: %v; want both api instances", after)
	}
	c.noSidecarRestarted(t, starts)
}
