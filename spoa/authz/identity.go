package authz

import (
	"crypto/x509"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/haconnect/haconnect/internal/meshid"
)

// Identity is the Consul service a client certificate was issued to.
type Identity struct {
	// ID is the certificate's SPIFFE ID, e.g.
	// spiffe://<cluster-uuid>.consul/ns/default/dc/dc1/svc/web.
	ID         spiffeid.ID
	Partition  string
	Namespace  string
	Datacenter string
	Service    string
	// NotBefore and NotAfter bound the certificate's validity; a decision
	// is never given, from the cache or not, outside them.
	NotBefore, NotAfter time.Time
}

// validAt reports whether the certificate is valid at now.
func (id *Identity) validAt(now time.Time) bool {
	return !now.Before(id.NotBefore) && now.Before(id.NotAfter)
}

// ParseIdentity reads the Consul service identity from a DER certificate. It
// requires exactly one URI SAN holding a Consul service SPIFFE ID:
//
//	spiffe://<td>/ns/<ns>/dc/<dc>/svc/<name>
//	spiffe://<td>/ap/<partition>/ns/<ns>/dc/<dc>/svc/<name>
//
// The chain and the validity period are not checked here; the Authorizer
// checks both on every decision.
func ParseIdentity(der []byte) (Identity, Reason, error) {
	_, id, reason, err := parseCertificate(der)
	return id, reason, err
}

func parseCertificate(der []byte) (*x509.Certificate, Identity, Reason, error) {
	if len(der) == 0 {
		return nil, Identity{}, ReasonNoCertificate, fmt.Errorf("no client certificate")
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, Identity{}, ReasonBadCertificate, fmt.Errorf("parse certificate: %w", err)
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return nil, Identity{}, ReasonNotSPIFFE, err
	}
	ident, err := serviceIdentity(id)
	if err != nil {
		return nil, Identity{}, ReasonNotService, err
	}
	ident.NotBefore, ident.NotAfter = cert.NotBefore, cert.NotAfter
	return cert, ident, 0, nil
}

func serviceIdentity(id spiffeid.ID) (Identity, error) {
	svc, err := meshid.Parse(id)
	if err != nil {
		return Identity{}, err
	}
	return Identity{ID: id, Partition: svc.Partition, Namespace: svc.Namespace, Datacenter: svc.Datacenter, Service: svc.Name}, nil
}
