package harness

import (
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// MeshCA makes Consul's Connect CA one whose key the test holds, so that
// the test can sign certificates that Consul's roots (and so HAProxy's
// ca-file and the SPOA) trust: many distinct callers for a benchmark, or a
// crafted certificate for an attack. The trust domain stays the cluster's;
// the previous root stays trusted, as in any CA rotation.
func (c *Consul) MeshCA(t testing.TB) *ForeignCA {
	t.Helper()
	ca := NewForeignCA(t)
	keyDER, err := x509.MarshalECPrivateKey(ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if _, err := c.Client.Connect().CASetConfig(&api.CAConfig{
		Provider: "consul",
		Config:   map[string]any{"PrivateKey": keyPEM, "RootCert": ca.CertPEM},
	}, nil); err != nil {
		t.Fatalf("set Consul's CA: %v", err)
	}
	WaitFor(t, 10*time.Second, "the test CA to be Consul's active root", func() bool {
		roots, _, err := c.Client.Agent().ConnectCARoots(nil)
		if err != nil {
			return false
		}
		for _, r := range roots.Roots {
			if r.Active && strings.TrimSpace(r.RootCertPEM) == strings.TrimSpace(ca.CertPEM) {
				return true
			}
		}
		return false
	})
	return ca
}
