package sidecar

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestPlanReloadsALeafAfterACAFileCommit: a new leaf is a reload (HAProxy
// 2.6.12 cannot commit a Consul leaf to a listener and keep its `verify
// required`), named leaf_after_ca_file once the running worker has
// committed a CA file (it could not commit a certificate then either).
// The roots alone go through the runtime API.
func TestPlanReloadsALeafAfterACAFileCommit(t *testing.T) {
	s := testSidecar(t, nil)
	state := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)
	step := func(what, leaf, root, method, reason string) {
		t.Helper()
		p := planApply(true, state, stateOf(t, s, testSnapshot(leaf, root, 1), state.slots))
		if p.method != method || p.reason != reason {
			t.Fatalf("%s: plan %s (%q) %v, want %s (%q)", what, p.method, p.reason, p.runtime, method, reason)
		}
		if p.method == methodReload && (p.runtime != nil || p.next.caCommitted) {
			t.Fatalf("%s: a reload plan with runtime commands %v or a CA file committed", what, p.runtime)
		}
		state = p.next
	}
	step("leaf", "LEAF2", "ROOT", methodReload, reasonLeaf)
	step("leaf and roots", "LEAF3", "ROOT2", methodReload, reasonLeaf)
	step("roots", "LEAF3", "ROOT3", methodRuntime, "")
	if !state.caCommitted {
		t.Fatal("a plan committing a CA file does not say so")
	}
	step("nothing", "LEAF3", "ROOT3", "", "")
	step("leaf after the roots", "LEAF4", "ROOT3", methodReload, reasonLeafAfterCAFile)
	step("roots after the reload", "LEAF4", "ROOT4", methodRuntime, "")
	step("roots again", "LEAF4", "ROOT5", methodRuntime, "")
	step("leaf and roots after the roots", "LEAF5", "ROOT6", methodReload, reasonLeafAfterCAFile)
}

// TestLeafRenewedAfterARootsChangeIsServed carries plans out against a real
// HAProxy as Consul reports a CA rotation: a root added, then the leaf
// re-issued, each on its own; then a leaf renewal, and roots and leaf
// changed together, twice, with leaves shaped as Consul's (no subject, a
// URI SAN). After each, the TLS handshake on the public listener shows the
// new leaf's serial, the listener still refuses a caller without a client
// certificate, and the upstream instance is shown the new leaf by HAProxy's
// health check. HAProxy runs throughout (the same master): no step
// crashes it.
func TestLeafRenewedAfterARootsChangeIsServed(t *testing.T) {
	s := testSidecar(t, nil) // the exec launcher: a real HAProxy
	a, reg := testApplier(t, s)
	oldCA, newCA, thirdCA := harness.NewForeignCA(t), harness.NewForeignCA(t), harness.NewForeignCA(t)
	self := "spiffe://" + testTD + "/ns/default/dc/dc1/svc/web"
	caller := oldCA.Issue(t, "spiffe://"+testTD+"/ns/default/dc/dc1/svc/api")
	inbound, upstream := harness.FreePort(t), harness.FreePort(t)

	// The upstream instance: a TLS listener that records the client
	// certificate of every handshake (HAProxy's health checks). No
	// session tickets: every handshake sends the certificate.
	presented := make(chan *x509.Certificate, 64)
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{caller.TLS},
		ClientAuth: tls.RequireAnyClientCert, SessionTicketsDisabled: true})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			_ = tc.SetDeadline(time.Now().Add(2 * time.Second))
			if tc.Handshake() == nil {
				select {
				case presented <- tc.ConnectionState().PeerCertificates[0]:
				default:
				}
			}
			tc.Close()
		}
	}()
	upstreamPort := l.Addr().(*net.TCPAddr).Port

	snap := func(leaf *harness.Leaf, roots string) snapshot {
		sn := testSnapshot(leaf.CertPEM, roots)
		sn.leaf.PrivateKeyPEM = leaf.KeyPEM
		sn.reg.BindAddr, sn.reg.BindPort = "127.0.0.1", inbound
		sn.reg.Upstreams[0].BindPort = upstream
		sn.endpoints["api"] = []endpoint{{Addr: "127.0.0.1", Port: upstreamPort}}
		return sn
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	apply := func(sn snapshot) plan {
		t.Helper()
		p := planApply(a.proc != nil, a.applied, stateOf(t, s, sn, a.applied.slots))
		if err := a.execute(ctx, p, time.Time{}); err != nil {
			t.Fatal(err)
		}
		return p
	}
	serves := func(what string, leaf *harness.Leaf) {
		t.Helper()
		want := leaf.TLS.Leaf
		if want == nil {
			var err error
			if want, err = x509.ParseCertificate(leaf.TLS.Certificate[0]); err != nil {
				t.Fatal(err)
			}
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", "127.0.0.1:"+strconv.Itoa(inbound),
			&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{caller.TLS}})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		got := c.ConnectionState().PeerCertificates[0].SerialNumber
		c.Close()
		if got.Cmp(want.SerialNumber) != 0 {
			t.Fatalf("%s: the listener serves serial %v, want the new leaf's %v", what, got, want.SerialNumber)
		}
		// It still requires a client certificate: a handshake without
		// one fails (in TLS 1.3 the client sees the alert on its first
		// read), so the SPOA is never asked about a caller it cannot see.
		if c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", "127.0.0.1:"+strconv.Itoa(inbound),
			&tls.Config{InsecureSkipVerify: true}); err == nil {
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			_, _ = c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
			_, rerr := c.Read(make([]byte, 1))
			c.Close()
			if rerr == nil {
				t.Fatalf("%s: the listener took a connection without a client certificate (verify required lost)", what)
			}
		}
		// The health checks run every second: the next ones present it.
		for deadline := time.After(5 * time.Second); ; {
			select {
			case cert := <-presented:
				if cert.SerialNumber.Cmp(want.SerialNumber) == 0 {
					return
				}
			case <-deadline:
				t.Fatalf("%s: the upstream instance is not shown serial %v", what, want.SerialNumber)
			}
		}
	}

	// Leaves shaped as Consul's: no subject, the SPIFFE ID as the only SAN.
	consulLeaf := func(ca *harness.ForeignCA) *harness.Leaf {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(self)
		return ca.SignCrafted(t, &x509.Certificate{URIs: []*url.URL{u}}, key)
	}
	leaf := func() *harness.Leaf { return consulLeaf(newCA) }
	first := consulLeaf(oldCA)
	if p := apply(snap(first, oldCA.CertPEM)); p.method != methodStart {
		t.Fatalf("first apply: %s, want start", p.method)
	}
	defer a.proc.Stop(time.Second)
	proc := a.proc
	serves("started", first)
	both := oldCA.CertPEM + newCA.CertPEM
	if p := apply(snap(first, both)); p.method != methodRuntime {
		t.Fatalf("a new root: %s, want runtime", p.method)
	}
	for _, st := range []struct {
		what, roots, method string
	}{
		{"the leaf renewed after the roots changed", both, methodReload},
		{"a leaf renewed later", both, methodReload},
		{"roots and leaf together", both + thirdCA.CertPEM, methodReload},
		{"roots and leaf together again", both, methodReload},
	} {
		l := leaf()
		p := apply(snap(l, st.roots))
		serves(st.what, l)
		if p.method != st.method {
			t.Fatalf("%s: %s (%s), want %s", st.what, p.method, p.reason, st.method)
		}
	}
	select {
	case <-proc.Done():
		t.Fatalf("HAProxy exited: %v", proc.Err())
	default:
	}
	if a.proc != proc {
		t.Fatal("HAProxy was started again")
	}
	if got := applies(t, reg); got["runtime/error"] != 0 || got["reload/ok"] != 4 {
		t.Fatalf("applies %v: want four planned reloads and no refused runtime change", got)
	}
}
