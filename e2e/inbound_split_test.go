package e2e

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// backendRequests reads how many streams (requests, in HTTP) each of in's
// backends has served, from `show stat` (stot).
func backendRequests(t testing.TB, in *instance) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, line := range strings.Split(in.admin(t, "show stat -1 2 -1"), "\n") {
		f := strings.Split(line, ",")
		if len(f) > 7 && f[1] == "BACKEND" {
			n, _ := strconv.Atoi(f[7])
			out[f[0]] = n
		}
	}
	return out
}

// TestSteadyRequestsGoToLocalApp: on an HTTP inbound listener, the
// requests of an allowed caller whose decision is fresh and whose intention
// has no HTTP permissions go to local_app, which has no SPOE filter and no
// check rule, and are still tagged; a connection's first request goes to
// local_app_check, which asks the SPOA. A denied caller's next requests on
// the same connection go to local_app_check again and are denied again:
// the shortcut is only ever taken with an allow in hand.
func TestSteadyRequestsGoToLocalApp(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", api.IntentionActionAllow), harness.Source("evil", api.IntentionActionDeny))
	// A decision fresh for the whole test: every request after the first
	// rides on it.
	apiIn := m.addInstance(&instance{id: "api-1", args: []string{"-ttl", "10m"}}, "api")
	roots, _ := m.consul.RootsPEM(t)
	get := func(c *http.Client) (int, string) {
		t.Helper()
		resp, err := c.Get(fmt.Sprintf("https://127.0.0.1:%d/", apiIn.port))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	// One keep-alive connection per caller.
	client := func(service string) *http.Client {
		return &http.Client{Transport: &http.Transport{TLSClientConfig: harness.ClientTLS(m.consul.IssueLeaf(t, service), roots),
			MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, ForceAttemptHTTP2: false, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}
	}

	before := backendRequests(t, apiIn)
	web := client("web")
	const n = 20
	for i := 0; i < n; i++ {
		if code, body := get(web); code != http.StatusOK || body != "api-1 source=web" {
			t.Fatalf("request %d from web: %d %q, want 200 tagged source=web", i+1, code, body)
		}
	}
	after := backendRequests(t, apiIn)
	if got := after["local_app_check"] - before["local_app_check"]; got != 1 {
		t.Errorf("local_app_check served %d of web's %d requests, want 1 (the connection's first)", got, n)
	}
	if got := after["local_app"] - before["local_app"]; got != n-1 {
		t.Errorf("local_app served %d of web's %d requests, want %d", got, n, n-1)
	}

	evil := client("evil")
	for i := 0; i < 3; i++ {
		if code, body := get(evil); code != http.StatusForbidden || !strings.Contains(body, "denied") {
			t.Fatalf("request %d from evil on its connection: %d %q, want 403 denied", i+1, code, body)
		}
	}
	final := backendRequests(t, apiIn)
	if got := final["local_app_check"] - after["local_app_check"]; got != 3 {
		t.Errorf("local_app_check saw %d of evil's 3 requests, want all 3", got)
	}
	if got := final["local_app"] - after["local_app"]; got != 0 {
		t.Errorf("local_app saw %d of evil's requests, want none", got)
	}
}
