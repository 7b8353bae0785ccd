package sidecar

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/internal/meshid"
	"github.com/haconnect/haconnect/plugin/render"
)

// TestUpstreamSNI: Consul's server names for a service target (its
// agent/connect/sni.go, ServiceSNI), computed from the identity the
// upstream's certificate must carry.
func TestUpstreamSNI(t *testing.T) {
	for _, tc := range []struct {
		self, dc, want string
	}{
		{"spiffe://" + testTD + "/ns/default/dc/dc1/svc/web", "",
			"api.default.dc1.internal." + testTD},
		{"spiffe://" + testTD + "/ns/default/dc/dc1/svc/web", "dc2",
			"api.default.dc2.internal." + testTD},
		// Outside the default partition: the partition is named and the
		// suffix is versioned.
		{"spiffe://" + testTD + "/ap/team-a/ns/billing/dc/dc1/svc/web", "",
			"api.billing.team-a.dc1.internal-v1." + testTD},
		{"spiffe://" + testTD + "/ap/team-a/ns/billing/dc/dc1/svc/web", "eu-west",
			"api.billing.team-a.eu-west.internal-v1." + testTD},
		// A partition spelled "default" is the default partition.
		{"spiffe://" + testTD + "/ap/default/ns/default/dc/dc1/svc/web", "",
			"api.default.dc1.internal." + testTD},
	} {
		self, err := meshid.ParseString(tc.self)
		if err != nil {
			t.Fatal(err)
		}
		if got := upstreamSNI(peerService(self, render.Upstream{Name: "api", Datacenter: tc.dc})); got != tc.want {
			t.Errorf("%s, upstream api in %q: %s, want %s", tc.self, tc.dc, got, tc.want)
		}
	}
	// An empty namespace is "default", as in Consul.
	self, _ := meshid.ParseString("spiffe://" + testTD + "/ns/default/dc/dc1/svc/web")
	self.Namespace = ""
	if got, want := upstreamSNI(peerService(self, render.Upstream{Name: "api"})), "api.default.dc1.internal."+testTD; got != want {
		t.Errorf("empty namespace: %s, want %s", got, want)
	}
}

// sameNameSnapshot is testSnapshot with api registered three times: in
// the local datacenter without naming it, in dc1 named, and in dc2.
func sameNameSnapshot(dc2Ports ...int) snapshot {
	snap := testSnapshot("LEAF", "ROOT", 1)
	base := snap.reg.Upstreams[0]
	reg := *snap.reg
	reg.Upstreams = nil
	for i, dc := range []string{"", "dc1", "dc2"} {
		u := base
		u.Datacenter, u.BindPort = dc, 9191+i
		reg.Upstreams = append(reg.Upstreams, u)
	}
	snap.reg = &reg
	snap.endpoints = map[string][]endpoint{"api": eps(1), "api@dc1": eps(1), "api@dc2": eps(dc2Ports...)}
	return snap
}

// TestSameNameUpstreamsInTheModel: each of the same-name upstreams gets
// its SNI (the trust domain from the roots, the datacenter its own or the
// local one), and a change of one's instances goes through the runtime API
// to that upstream's backend alone.
func TestSameNameUpstreamsInTheModel(t *testing.T) {
	s := testSidecar(t, nil)
	prev := stateOf(t, s, sameNameSnapshot(7), nil)
	want := []string{"api.default.dc1.internal." + testTD, "api.default.dc1.internal." + testTD, "api.default.dc2.internal." + testTD}
	for i, u := range prev.model.Upstreams {
		if u.SNI != want[i] {
			t.Errorf("upstream %s: SNI %q, want %q", upstreamKey(u), u.SNI, want[i])
		}
	}
	next := stateOf(t, s, sameNameSnapshot(7, 8), prev.slots)
	p := planApply(true, prev, next)
	if p.method != methodRuntime {
		t.Fatalf("a new instance of api@dc2: method %q (reason %q), want runtime", p.method, p.reason)
	}
	var cmds []string
	for _, c := range p.runtime {
		cmds = append(cmds, c.String())
	}
	got := strings.Join(cmds, "\n")
	if !strings.Contains(got, "set server upstream_api:dc2/s2 addr 10.0.0.1 port 8") || strings.Contains(got, "upstream_api/") ||
		strings.Contains(got, "upstream_api:dc1/") {
		t.Errorf("runtime commands for a new api@dc2 instance:\n%s", got)
	}
}

// TestSNILoggedOncePerUpstream: each upstream's SNI is logged with the
// upstream's name once, and again only when it changes.
func TestSNILoggedOncePerUpstream(t *testing.T) {
	s := testSidecar(t, nil)
	var buf bytes.Buffer
	s.applier.log = hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info})
	m := stateOf(t, s, sameNameSnapshot(7), nil).model
	s.logSNIs(m)
	s.logSNIs(m)
	const msg = "upstream SNI not sent"
	for _, l := range []string{"upstream=api sni=api.default.dc1.internal.", "upstream=api@dc1 sni=api.default.dc1.internal.",
		"upstream=api@dc2 sni=api.default.dc2.internal."} {
		n := 0
		for _, line := range strings.Split(buf.String(), "\n") {
			if strings.Contains(line, msg) && strings.Contains(line, l) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%q logged %d times, want once:\n%s", l, n, buf.String())
		}
	}
	buf.Reset()
	m.Upstreams[2].SNI = "api.default.dc3.internal." + testTD
	s.logSNIs(m)
	if got := strings.Count(buf.String(), msg); got != 1 || !strings.Contains(buf.String(), "upstream=api@dc2 sni=api.default.dc3.internal.") {
		t.Errorf("after one SNI changed, logged:\n%s", buf.String())
	}
}

// TestWithoutGateways: terminating gateways among an upstream's instances
// are left out and named once each, sorted; sidecars stay as they are.
func TestWithoutGateways(t *testing.T) {
	side := []endpoint{{Addr: "10.0.0.1", Port: 21000}, {Addr: "10.0.0.2", Port: 21000}}
	if got, gws := withoutGateways(side); gws != "" || len(got) != 2 {
		t.Errorf("sidecars only: kept %v, gateways %q", got, gws)
	}
	mixed := []endpoint{{Addr: "10.0.0.9", Port: 8443, Gateway: "tgw-b"}, side[0], {Addr: "10.0.0.8", Port: 8443, Gateway: "tgw-a"},
		{Addr: "10.0.0.7", Port: 8443, Gateway: "tgw-b"}}
	got, gws := withoutGateways(mixed)
	if gws != "tgw-a,tgw-b" || len(got) != 1 || got[0] != side[0] {
		t.Errorf("mixed: kept %v, gateways %q; want only %v and tgw-a,tgw-b", got, gws, side[0])
	}
}
