package e2e

import (
	"fmt"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
)

// BenchmarkL7Check measures what checking every request against HTTP
// permissions costs next to the connection-level (L4) check, through one
// sidecar in one run. Only the caller differs between the scenarios:
//
//	l4          web: an L4 intention, decided once per connection
//	l7          batch: permissions on method and path, matched per
//	            request by HAProxy (native L7 matching)
//	l7-spoa     batch again, through a second sidecar run with
//	            -spoa-only-l7: each request is sent to its SPOA
//	l7+headers  fresh: a permission on a header too (the SPOA decides:
//	            HAProxy sends the header block)
//
// The CPU per request counts HAProxy (pinned alone to CPU 0) and the
// sidecar process, whose embedded SPOA answers each L7 check. Both
// sidecars run with telemetry (-admin-bind), which native matching
// needs for its counts.
func BenchmarkL7Check(b *testing.B) {
	m := &mesh{consul: harness.StartConsul(b)}
	m.consul.SetProtocol(b, "api", "http")
	perms := func(h api.IntentionHTTPPermission) []*api.IntentionPermission {
		return []*api.IntentionPermission{
			{Action: api.IntentionActionDeny, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/admin"}},
			{Action: api.IntentionActionAllow, HTTP: &h},
		}
	}
	m.consul.SetIntentions(b, "api",
		harness.Source("web", api.IntentionActionAllow),
		&api.SourceIntention{Name: "batch", Permissions: perms(api.IntentionHTTPPermission{PathPrefix: "/api/", Methods: []string{"GET", "HEAD"}})},
		&api.SourceIntention{Name: "fresh", Permissions: perms(api.IntentionHTTPPermission{PathPrefix: "/api/",
			Header: []api.IntentionHTTPHeaderPermission{{Name: "x-tenant", Exact: "blue"}}})},
	)
	app := benchApp(b)
	admin := func() string { return fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b)) }
	in := benchRegister(b, m, "api-l7", app, "-admin-bind", admin())
	spoaIn := benchRegister(b, m, "api-l7-spoa", app, "-admin-bind", admin(), "-spoa-only-l7")
	roots, _ := m.consul.RootsPEM(b)
	addr := fmt.Sprintf("127.0.0.1:%d", in.port)
	pids, sidecar := haproxyPids(b, in), []int{in.sidecar.Cmd.Process.Pid}
	as := func(caller string, headers ...string) loadgen.Config {
		return loadgen.Config{TLS: harness.ClientTLS(m.consul.IssueLeaf(b, caller), roots), Path: "/api/items", Headers: headers}
	}
	scenarios := []*scenario{
		{name: "l4", addr: addr, pids: pids, alsoCPU: sidecar, load: as("web")},
		{name: "l7", addr: addr, pids: pids, alsoCPU: sidecar, load: as("batch")},
		{name: "l7-spoa", addr: fmt.Sprintf("127.0.0.1:%d", spoaIn.port), pids: haproxyPids(b, spoaIn),
			alsoCPU: []int{spoaIn.sidecar.Cmd.Process.Pid}, load: as("batch")},
		{name: "l7+headers", addr: addr, pids: pids, alsoCPU: sidecar, load: as("fresh", "x-tenant: blue")},
	}
	measure(b, scenarios)
	if got := backendRequests(b, in)["local_app_l7"]; got == 0 {
		b.Fatal("the l7 scenario's requests were not matched natively (local_app_l7 served none)")
	}
	reportRatios(b, scenarios, scenarios[0])
}
