// Package meshid reads and builds the SPIFFE IDs Consul gives Connect
// services, with go-spiffe:
//
//	spiffe://<td>/ns/<ns>/dc/<dc>/svc/<name>
//	spiffe://<td>/ap/<partition>/ns/<ns>/dc/<dc>/svc/<name>
//
// The partition segment is present only outside the default partition, as
// Consul writes it.
package meshid

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Service is a Consul service identity.
type Service struct {
	TrustDomain spiffeid.TrustDomain
	Partition   string // "default" when the ID has no /ap/ segment
	Namespace   string
	Datacenter  string
	Name        string
}

// Parse reads a Consul service identity from a SPIFFE ID.
func Parse(id spiffeid.ID) (Service, error) {
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	s := Service{TrustDomain: id.TrustDomain(), Partition: "default"}
	if len(seg) == 8 && seg[0] == "ap" {
		s.Partition = seg[1]
		seg = seg[2:]
	}
	if len(seg) != 6 || seg[0] != "ns" || seg[2] != "dc" || seg[4] != "svc" ||
		seg[1] == "" || seg[3] == "" || seg[5] == "" {
		return Service{}, fmt.Errorf("SPIFFE ID %q is not a Consul service identity", id)
	}
	s.Namespace, s.Datacenter, s.Name = seg[1], seg[3], seg[5]
	return s, nil
}

// ParseString reads a Consul service identity from the text of a SPIFFE ID.
func ParseString(uri string) (Service, error) {
	id, err := spiffeid.FromString(uri)
	if err != nil {
		return Service{}, err
	}
	return Parse(id)
}

// ID is the service's SPIFFE ID.
func (s Service) ID() (spiffeid.ID, error) {
	ns := s.Namespace
	if ns == "" {
		ns = "default"
	}
	path := fmt.Sprintf("/ns/%s/dc/%s/svc/%s", ns, s.Datacenter, s.Name)
	if s.Partition != "" && s.Partition != "default" {
		path = "/ap/" + s.Partition + path
	}
	return spiffeid.FromPath(s.TrustDomain, path)
}
