package e2e

import (
	"fmt"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// BenchmarkInboundPath compares haconnect's inbound path with bare HAProxy
// mTLS on keep-alive connections, in alternating rounds of one run:
//
//	bare       HAProxy mTLS straight to the app (the ceiling)
//	authz+tags the sidecar: SPOA authorization once per connection + tagging
//	full       the same plus telemetry (-admin-bind)
//
// Each HAProxy under test runs one thread pinned alone to CPU 0; the load
// generator, the app, the SPOA and Consul share CPU 1. It reports median
// req/s and HAProxy CPU per request, and the ratios to bare (target for
// full: >= 0.90 of bare req/s).
func BenchmarkInboundPath(b *testing.B) {
	m := &mesh{consul: harness.StartConsul(b)}
	m.consul.SetIntentions(b, "api", harness.Source("web", api.IntentionActionAllow))
	appPort := benchApp(b)
	bareAddr, barePid := bareMTLS(b, m.consul, appPort)
	tags := benchRegister(b, m, "api-tags", appPort)
	full := benchRegister(b, m, "api-full", appPort, "-admin-bind", fmt.Sprintf("127.0.0.1:%d", harness.FreePort(b)))
	scenarios := []*scenario{
		{name: "bare", addr: bareAddr, pids: []int{barePid}},
		{name: "authz+tags", addr: fmt.Sprintf("127.0.0.1:%d", tags.port), pids: haproxyPids(b, tags)},
		{name: "full", addr: fmt.Sprintf("127.0.0.1:%d", full.port), pids: haproxyPids(b, full)},
	}
	roots, _ := m.consul.RootsPEM(b)
	tlsCfg := harness.ClientTLS(m.consul.IssueLeaf(b, "web"), roots)
	for _, sc := range scenarios {
		sc.load.TLS = tlsCfg
	}
	measure(b, scenarios)
	reportRatios(b, scenarios, scenarios[0])
}
