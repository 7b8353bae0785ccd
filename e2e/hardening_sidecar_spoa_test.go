package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestSidecarExternalSPOAOverMutualTLS: a sidecar whose inbound callers
// are authorized by a shared haconnect-spoa on TCP reaches it with mutual
// TLS (-spoa-tls-*): allowed and denied callers are told apart through it.
// The same sidecar without a client certificate gets no answer from the
// agent, and fails closed.
func TestSidecarExternalSPOAOverMutualTLS(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	dir := harness.TempDir(t)
	spoaCA, clientCA := harness.NewForeignCA(t), harness.NewForeignCA(t)
	server := spoaCA.IssueHost(t, "haconnect-spoa", "haconnect-spoa")
	client := clientCA.IssueHost(t, "haproxy")
	file := func(name, content string) string { return harness.WriteFile(t, dir, name, content) }
	addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	harness.Start(t, "haconnect-spoa", harness.Binary(t, "haconnect-spoa"), append([]string{
		"-listen", addr, "-target", "api",
		"-tls-cert", file("spoa.pem", server.CertPEM), "-tls-key", file("spoa.key", server.KeyPEM),
		"-tls-client-ca", file("haproxy-ca.pem", clientCA.CertPEM)},
		m.consul.Flags(m.consul.Addr, "")...)...)
	harness.WaitListening(t, addr, 10*time.Second)

	tlsArgs := []string{"-spoa-addr", addr,
		"-spoa-tls-cert", file("client.pem", client.CertPEM), "-spoa-tls-key", file("client.key", client.KeyPEM),
		"-spoa-tls-ca", file("spoa-ca.pem", spoaCA.CertPEM), "-spoa-tls-server-name", "haconnect-spoa"}
	api1 := m.addInstance(&instance{id: "api-1", args: tlsArgs}, "api")
	web := m.add("web", "web-1", "api")
	batch := m.add("batch", "batch-1", "api")
	harness.WaitFor(t, 10*time.Second, "web allowed through the shared SPOA", func() bool {
		code, body, _ := web.call("api")
		return code == 200 && strings.Contains(body, "source=web")
	})
	if code, _, _ := batch.call("api"); code == 200 {
		t.Fatalf("batch: %d, want a denial", code)
	}
	cfg := readFile(t, filepath.Join(api1.dir, "haproxy.cfg"))
	if !strings.Contains(cfg, "server spoa "+addr+" ssl crt ") || !strings.Contains(cfg, "verifyhost haconnect-spoa") {
		t.Fatalf("the SPOE backend does not use mutual TLS:\n%s", cfg)
	}

	t.Run("without a client certificate the sidecar gets no answer and denies", func(t *testing.T) {
		m.addInstance(&instance{id: "api-2", args: []string{"-spoa-addr", addr}}, "api")
		m.consul.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
		api1.sidecar.Kill()
		harness.WaitFor(t, 20*time.Second, "web denied by api-2 (no SPOA answer)", func() bool {
			code, body, _ := web.call("api")
			return code != 200 && (code == 502 || strings.Contains(body, "authorization_unavailable"))
		})
	})
}
