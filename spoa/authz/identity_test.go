package authz

import (
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestServiceIdentity(t *testing.T) {
	for _, tc := range []struct {
		uri                string
		ok                 bool
		part, ns, dc, name string
	}{
		{"spiffe://abc.consul/ns/default/dc/dc1/svc/web", true, "default", "default", "dc1", "web"},
		{"spiffe://abc.consul/ap/team/ns/ops/dc/dc2/svc/db", true, "team", "ops", "dc2", "db"},
		{"spiffe://abc.consul/agent/client/dc/dc1/id/123", false, "", "", "", ""},
		{"spiffe://abc.consul/ns/default/dc/dc1/svc/web/extra", false, "", "", "", ""},
		{"spiffe://abc.consul/ns/default/svc/web", false, "", "", "", ""},
		{"spiffe://abc.consul", false, "", "", "", ""},
	} {
		id, err := spiffeid.FromString(tc.uri)
		if err != nil {
			t.Fatalf("%s: %v", tc.uri, err)
		}
		got, err := serviceIdentity(id)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tc.uri, err, tc.ok)
			continue
		}
		if tc.ok && (got.Partition != tc.part || got.Namespace != tc.ns || got.Datacenter != tc.dc || got.Service != tc.name) {
			t.Errorf("%s: got %+v", tc.uri, got)
		}
	}
}

func TestSourceMatches(t *testing.T) {
	web := &Identity{Partition: "default", Namespace: "default", Service: "web"}
	for _, tc := range []struct {
		name string
		ixn  api.Intention
		want bool
	}{
		{"exact name", api.Intention{SourceName: "web"}, true},
		{"other name", api.Intention{SourceName: "db"}, false},
		{"wildcard name", api.Intention{SourceName: "*"}, true},
		{"explicit default namespace", api.Intention{SourceNS: "default", SourceName: "web"}, true},
		{"other namespace", api.Intention{SourceNS: "ops", SourceName: "web"}, false},
		{"wildcard namespace", api.Intention{SourceNS: "*", SourceName: "*"}, true},
		{"other partition", api.Intention{SourcePartition: "team", SourceName: "web"}, false},
		{"from a peer", api.Intention{SourcePeer: "east", SourceName: "web"}, false},
		{"from a sameness group", api.Intention{SourceSamenessGroup: "g", SourceName: "web"}, false},
		{"consul source type", api.Intention{SourceType: api.IntentionSourceConsul, SourceName: "web"}, true},
		{"other source type", api.Intention{SourceType: "external-uri", SourceName: "web"}, false},
	} {
		if got := sourceMatches(&tc.ixn, web); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestReasonsHaveNames(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		s := r.String()
		if s == "unknown" || seen[s] {
			t.Errorf("reason %d: name %q missing or repeated", r, s)
		}
		seen[s] = true
	}
}
