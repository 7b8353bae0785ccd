package harness

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Leaf is a service certificate issued by Consul's Connect CA.
type Leaf struct {
	CertPEM string
	KeyPEM  string
	TLS     tls.Certificate
	URI     string
}

// IssueLeaf asks the agent for the leaf certificate of service.
func (c *Consul) IssueLeaf(t testing.TB, service string) *Leaf {
	t.Helper()
	leaf, _, err := c.Client.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		t.Fatalf("leaf for %s: %v", service, err)
	}
	return leafFromPEM(t, leaf.CertPEM, leaf.PrivateKeyPEM, leaf.ServiceURI)
}

func leafFromPEM(t testing.TB, certPEM, keyPEM, uri string) *Leaf {
	t.Helper()
	cert, err := tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		t.Fatalf("leaf key pair: %v", err)
	}
	return &Leaf{CertPEM: certPEM, KeyPEM: keyPEM, TLS: cert, URI: uri}
}

// RootsPEM returns the Connect CA roots as one PEM bundle, and the trust
// domain.
func (c *Consul) RootsPEM(t testing.TB) (string, string) {
	t.Helper()
	roots, _, err := c.Client.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatalf("CA roots: %v", err)
	}
	var b strings.Builder
	for _, r := range roots.Roots {
		b.WriteString(strings.TrimSpace(r.RootCertPEM) + "\n")
	}
	return b.String(), roots.TrustDomain
}

// WriteFile writes content to dir/name with mode 0600 and returns the path.
func WriteFile(t testing.TB, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// ForeignCA is a CA outside Consul's Connect CA: for certificates Consul
// never issued, and for the agent's own HTTPS.
type ForeignCA struct {
	CertPEM string
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
}

// NewForeignCA creates a self-signed CA.
func NewForeignCA(t testing.TB) *ForeignCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "haconnect test foreign CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &ForeignCA{CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), cert: cert, key: key}
}

// Issue signs a client certificate carrying the given URI SANs.
func (ca *ForeignCA) Issue(t testing.TB, uris ...string) *Leaf {
	t.Helper()
	tmpl := &x509.Certificate{Subject: pkix.Name{CommonName: "foreign"}}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	uri := ""
	if len(uris) > 0 {
		uri = uris[0]
	}
	return ca.sign(t, tmpl, uri)
}

// IssueValid signs a client certificate carrying uri, valid from notBefore
// to notAfter.
func (ca *ForeignCA) IssueValid(t testing.TB, uri string, notBefore, notAfter time.Time) *Leaf {
	t.Helper()
	parsed, err := url.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	return ca.sign(t, &x509.Certificate{Subject: pkix.Name{CommonName: "foreign"}, URIs: []*url.URL{parsed},
		NotBefore: notBefore, NotAfter: notAfter}, uri)
}

// IssueHost signs a certificate for a TLS server or client named by
// dnsNames (none: a client certificate with only a common name).
func (ca *ForeignCA) IssueHost(t testing.TB, commonName string, dnsNames ...string) *Leaf {
	t.Helper()
	return ca.sign(t, &x509.Certificate{Subject: pkix.Name{CommonName: commonName}, DNSNames: dnsNames}, "")
}

// sign completes tmpl (a fresh key, a day's validity, server and client
// use) and signs it.
func (ca *ForeignCA) sign(t testing.TB, tmpl *x509.Certificate, uri string) *Leaf {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	if tmpl.NotAfter.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
		tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	certPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	keyPEM := string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	return leafFromPEM(t, certPEM, keyPEM, uri)
}

// ClientTLS returns a TLS client configuration that presents leaf (nil: no
// certificate) and verifies the server's chain against rootsPEM. Mesh
// certificates carry SPIFFE URIs, not host names, so the chain is checked
// without a host name, as Connect proxies do.
func ClientTLS(leaf *Leaf, rootsPEM string) *tls.Config {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(rootsPEM))
	cfg := &tls.Config{
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return fmt.Errorf("no server certificate")
			}
			certs := make([]*x509.Certificate, len(raw))
			for i, r := range raw {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return err
				}
				certs[i] = c
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			return err
		},
	}
	if leaf != nil {
		cfg.Certificates = []tls.Certificate{leaf.TLS}
	}
	return cfg
}

// Callers returns the DER leaf certificates of n distinct services named
// <prefix>-0, <prefix>-1, ..., issued by the agent: genuine callers, so
// that benchmarks can present many distinct ones.
func (c *Consul) Callers(t testing.TB, prefix string, n int) [][]byte {
	t.Helper()
	out := make([][]byte, n)
	for i := range out {
		out[i] = c.IssueLeaf(t, fmt.Sprintf("%s-%d", prefix, i)).TLS.Certificate[0]
	}
	return out
}
