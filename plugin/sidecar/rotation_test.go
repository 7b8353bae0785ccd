package sidecar

import (
	"context"
	"crypto/tls"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/harness"
)

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestLeafRenewedAfterARootsChangeIsServed carries plans out against a real
// HAProxy: a CA rotation that adds a root, then the leaf re-issued by the
// new root, each applied on its own as Consul reports them. HAProxy 2.6.12
// accepts the second certificate commit without serving it; the applier
// must notice and reload, so that the new leaf is served.
func TestLeafRenewedAfterARootsChangeIsServed(t *testing.T) {
	s := testSidecar(t, nil) // the exec launcher: a real HAProxy
	a, _ := testApplier(t, s)
	oldCA, newCA := harness.NewForeignCA(t), harness.NewForeignCA(t)
	self := "spiffe://" + testTD + "/ns/default/dc/dc1/svc/web"
	leaf1, leaf2 := oldCA.Issue(t, self), newCA.Issue(t, self)
	caller := oldCA.Issue(t, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/api")
	inbound, upstream := freePort(t), freePort(t)

	snap := func(leaf *harness.Leaf, roots string) snapshot {
		sn := testSnapshot(leaf.CertPEM, roots, 1)
		sn.leaf.PrivateKeyPEM = leaf.KeyPEM
		sn.reg.BindAddr, sn.reg.BindPort = "127.0.0.1", inbound
		sn.reg.Upstreams[0].BindPort = upstream
		return sn
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	apply := func(sn snapshot) string {
		t.Helper()
		next := stateOf(t, s, sn, a.applied.slots)
		p := planApply(a.proc != nil, a.applied, next)
		if err := a.execute(ctx, p, time.Time{}); err != nil {
			t.Fatal(err)
		}
		return p.method
	}
	served := func() string {
		t.Helper()
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", "127.0.0.1:"+strconv.Itoa(inbound),
			&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{caller.TLS}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return string(c.ConnectionState().PeerCertificates[0].Raw)
	}

	if m := apply(snap(leaf1, oldCA.CertPEM)); m != methodStart {
		t.Fatalf("first apply: %s, want start", m)
	}
	defer a.proc.Stop(time.Second)
	if served() != string(leaf1.TLS.Certificate[0]) {
		t.Fatal("the started HAProxy does not serve the leaf")
	}
	if m := apply(snap(leaf1, oldCA.CertPEM+newCA.CertPEM)); m != methodRuntime {
		t.Fatalf("a new root: %s, want runtime", m)
	}
	apply(snap(leaf2, oldCA.CertPEM+newCA.CertPEM))
	if served() != string(leaf2.TLS.Certificate[0]) {
		t.Fatal("the leaf renewed after a roots change is not served")
	}
}
