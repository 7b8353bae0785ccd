package meshid

import "testing"

func TestRoundTrip(t *testing.T) {
	for _, uri := range []string{
		"spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web",
		"spiffe://td.consul/ap/blue/ns/team/dc/east/svc/api",
	} {
		s, err := ParseString(uri)
		if err != nil {
			t.Fatal(err)
		}
		id, err := s.ID()
		if err != nil || id.String() != uri {
			t.Errorf("%s: back to %s (%v)", uri, id, err)
		}
	}
	s, _ := ParseString("spiffe://td.consul/ap/default/ns/default/dc/dc1/svc/web")
	if id, _ := s.ID(); id.String() != "spiffe://td.consul/ns/default/dc/dc1/svc/web" {
		t.Errorf("the default partition is written without /ap/: %s", id)
	}
	for _, bad := range []string{"spiffe://td/x", "spiffe://td/ns//dc/dc1/svc/web", "spiffe://td/ns/a/dc/b/svc/c/extra", "not a uri"} {
		if _, err := ParseString(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
