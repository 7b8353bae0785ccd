package authz

import (
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
)

// trust is what the CA roots say: the cluster's trust domain and the
// certificates a caller's chain must lead to.
type trust struct {
	domain string
	roots  *x509.CertPool
}

// newTrust reads Consul's CA roots. Every root is trusted, not only the
// active one: during a CA rotation leaves of the previous root are still in
// use, as they are for HAProxy's ca-file.
func newTrust(list *api.CARootList) (*trust, error) {
	if list.TrustDomain == "" {
		return nil, errors.New("consul reports no trust domain (is Connect enabled?)")
	}
	t := &trust{domain: list.TrustDomain, roots: x509.NewCertPool()}
	for _, r := range list.Roots {
		if !t.roots.AppendCertsFromPEM([]byte(r.RootCertPEM)) {
			return nil, fmt.Errorf("CA root %q: no certificate in its PEM", r.ID)
		}
	}
	if len(list.Roots) == 0 {
		return nil, errors.New("consul reports no CA root")
	}
	return t, nil
}

// verify checks that cert is signed by one of the roots and is valid at
// now. HAProxy verified the chain already during the handshake; the SPOA
// checks it again because anyone who can reach it could send any
// certificate, and only genuine callers may take a place in the decision
// cache. Consul's built-in CA signs leaves with its root; a CA whose leaves
// are signed by an intermediate is not supported (HAProxy passes the leaf
// alone).
func (t *trust) verify(cert *x509.Certificate, now time.Time) error {
	_, err := cert.Verify(x509.VerifyOptions{
		Roots:       t.roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return err
}
