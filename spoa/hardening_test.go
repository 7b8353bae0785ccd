package spoa

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/haconnect/haconnect/spoa/spop/spoptest"
)

// recordingDecider allows everything and remembers the destinations it
// was asked about.
type recordingDecider struct {
	mu    sync.Mutex
	asked []string
}

func (r *recordingDecider) Decide(target string, _ []byte) *authz.Decision {
	r.mu.Lock()
	r.asked = append(r.asked, target)
	r.mu.Unlock()
	return authz.Deny(authz.ReasonIntentionDeny) // what matters is who was asked
}

// serveAgent runs srv on l and returns a connected client.
func serveAgent(t *testing.T, srv *Server, l net.Listener) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func varsByName(vars []spoptest.Var) map[string]spop.Value {
	m := map[string]spop.Value{}
	for _, v := range vars {
		m[v.Name] = v.Value
	}
	return m
}

// TestTargetMismatch: an agent started for one destination never decides
// for another, whatever a message names; the denial is counted.
func TestTargetMismatch(t *testing.T) {
	dec := &recordingDecider{}
	reg := prometheus.NewRegistry()
	srv, err := NewServer(Config{Decider: dec, Destination: "api", Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveAgent(t, srv, l)
	c, err := spoptest.Dial("tcp", l.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cert := spoptest.ArgValue{Name: ArgCert, Value: []byte{0x30}}

	for _, named := range []string{"db", "junk-1", "junk-2"} {
		vars, err := c.Notify(MessageName, cert, spoptest.ArgValue{Name: ArgTarget, Value: named})
		if err != nil {
			t.Fatal(err)
		}
		got := varsByName(vars)
		if got[VarAuth].Bool || string(got[VarReason].Bytes) != "target_mismatch" {
			t.Fatalf("target %q: auth=%v reason=%q, want a target_mismatch denial", named, got[VarAuth].Bool, got[VarReason].Bytes)
		}
	}
	vars, err := c.Notify(MessageL7, cert, spoptest.ArgValue{Name: ArgTarget, Value: "db"},
		spoptest.ArgValue{Name: ArgMethod, Value: "GET"}, spoptest.ArgValue{Name: ArgPath, Value: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if got := varsByName(vars); got[VarL7Auth].Bool || string(got[VarL7Reason].Bytes) != "target_mismatch" {
		t.Fatalf("l7 message for db: %+v, want a target_mismatch denial", got)
	}
	// The agent's own destination, named or implied, is decided.
	for _, args := range [][]spoptest.ArgValue{{cert, {Name: ArgTarget, Value: "api"}}, {cert}} {
		if _, err := c.Notify(MessageName, args...); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(dec.asked, []string{"api", "api"}) {
		t.Fatalf("the decider was asked about %q, want only api twice", dec.asked)
	}
	if n := counterValue(srv.mismatch); n != 4 {
		t.Fatalf("target_mismatch_total = %v, want 4", n)
	}

	// Without -target, each message names its destination (a shared agent).
	shared := &recordingDecider{}
	srv2, _ := NewServer(Config{Decider: shared})
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	serveAgent(t, srv2, l2)
	c2, err := spoptest.Dial("tcp", l2.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Notify(MessageName, cert, spoptest.ArgValue{Name: ArgTarget, Value: "db"}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(shared.asked, []string{"db"}) {
		t.Fatalf("shared agent asked about %q, want db", shared.asked)
	}
}

// TestListenUnixSocketMode: the socket is created with the mode asked
// (0600 by default), never looser in between, and with the group asked.
func TestListenUnixSocketMode(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		cfg  ListenConfig
		want os.FileMode
	}{
		{ListenConfig{}, 0o600},
		{ListenConfig{Mode: 0o660, Group: strconv.Itoa(os.Getgid())}, 0o660},
	} {
		path := filepath.Join(dir, "spoa.sock")
		l, err := tc.cfg.Listen("unix:" + path)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != tc.want {
			t.Errorf("%+v: socket mode %#o, want %#o", tc.cfg, got, tc.want)
		}
		l.Close()
	}
	if _, err := (ListenConfig{Mode: 0o4755}).Listen(filepath.Join(dir, "x.sock")); err == nil {
		t.Error("a mode with setuid bits was accepted")
	}
	if _, err := (ListenConfig{Group: "no-such-group-haconnect"}).Listen(filepath.Join(dir, "y.sock")); err == nil {
		t.Error("an unknown group was accepted")
	}
}

// TestListenRefusesOpenTCP: TCP beyond loopback needs TLS, or an explicit
// acceptance of the risk.
func TestListenRefusesOpenTCP(t *testing.T) {
	if _, err := Listen("0.0.0.0:0"); err == nil {
		t.Fatal("a plain TCP listener on every address was opened")
	}
	if _, err := Listen(":0"); err == nil {
		t.Fatal("a plain TCP listener on every address (empty host) was opened")
	}
	for _, cfg := range []ListenConfig{{}, {Insecure: true}, {TLS: &tls.Config{}}} {
		addr := "127.0.0.1:0"
		if cfg.Insecure || cfg.TLS != nil {
			addr = "0.0.0.0:0" // listens, but the test only talks to loopback
		}
		l, err := cfg.Listen(addr)
		if err != nil {
			t.Fatalf("%+v on %s: %v", cfg, addr, err)
		}
		l.Close()
	}
}

// TestSPOPOverMutualTLS: with TLS, only a peer presenting a certificate of
// the client CA can speak SPOP; a peer without one, with one of another
// CA, or without TLS at all is refused and counted.
func TestSPOPOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, other := harness.NewForeignCA(t), harness.NewForeignCA(t)
	server := ca.IssueHost(t, "haconnect-spoa", "localhost")
	certFile := harness.WriteFile(t, dir, "spoa.pem", server.CertPEM)
	keyFile := harness.WriteFile(t, dir, "spoa.key", server.KeyPEM)
	caFile := harness.WriteFile(t, dir, "ca.pem", ca.CertPEM)
	tlsCfg, err := ServerTLS(certFile, keyFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	srv, err := NewServer(Config{Decider: &recordingDecider{}, Destination: "api", Registerer: reg,
		Limits: spop.Limits{HelloTimeout: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := ListenConfig{TLS: tlsCfg}.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveAgent(t, srv, l)
	addr := l.Addr().String()

	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM([]byte(ca.CertPEM))
	dial := func(cert *harness.Leaf) (*spoptest.Client, error) {
		cfg := &tls.Config{RootCAs: roots, ServerName: "localhost"}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{cert.TLS}
		}
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
		if err != nil {
			return nil, err
		}
		c, err := spoptest.NewClient(conn, spop.DefaultMaxFrameSize, 5*time.Second)
		if err != nil {
			return nil, err
		}
		_, err = c.Notify(MessageName, spoptest.ArgValue{Name: ArgCert, Value: []byte{0x30}})
		return c, err
	}

	c, err := dial(ca.IssueHost(t, "haproxy"))
	if err != nil {
		t.Fatalf("HAProxy's certificate from the client CA: %v", err)
	}
	c.Close()
	for name, cert := range map[string]*harness.Leaf{"no certificate": nil, "another CA": other.IssueHost(t, "haproxy")} {
		if c, err := dial(cert); err == nil {
			c.Close()
			t.Errorf("%s: SPOP answered", name)
		}
	}
	if plain, err := spoptest.Dial("tcp", addr, 3*time.Second); err == nil {
		plain.Close()
		t.Error("plain TCP: SPOP answered")
	}
	rejected := srv.rejected.WithLabelValues(spop.RejectTLS)
	harness.WaitFor(t, 5*time.Second, "three refused handshakes counted", func() bool {
		return counterValue(rejected) == 3
	})
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}
