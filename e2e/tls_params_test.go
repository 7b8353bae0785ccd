package e2e

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// tlsPeer is an upstream sidecar under the test's control (a TLS server
// with the upstream's real Consul leaf that requires a client certificate
// from Consul's CA, as Envoy's public listener does, and offers TLS 1.3
// and every cipher Go has) that records what each handshake negotiated.
type tlsPeer struct {
	port int
	mu   sync.Mutex
	seen []tls.ConnectionState
}

func startTLSPeer(t *testing.T, leaf *harness.Leaf, rootsPEM string) *tlsPeer {
	t.Helper()
	p := &tlsPeer{}
	l := peerListener(t, leaf, rootsPEM, func(cfg *tls.Config) { cfg.MaxVersion = tls.VersionTLS13 })
	p.port = l.Addr().(*net.TCPAddr).Port
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.seen = append(p.seen, *r.TLS)
		p.mu.Unlock()
		fmt.Fprint(w, "tls peer")
	})}
	go func() { _ = srv.Serve(l) }()
	return p
}

func (p *tlsPeer) states() []tls.ConnectionState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]tls.ConnectionState(nil), p.seen...)
}

// TestSidecarTLSParameters: what the sidecars negotiate.
//   - Between sidecars (web's upstream to a peer that offers TLS 1.3 and
//     every cipher): TLS 1.2 with ECDHE-ECDSA and AES-128-GCM, what Envoy
//     offers as a client by default, chosen for its lower record cost on
//     OpenSSL 3.0 (docs/benchmarks.md).
//   - The inbound listener: a caller offering TLS 1.3 (Consul's built-in
//     proxy, any Go client) gets TLS 1.3 with AES-128-GCM; in TLS 1.2 the
//     listener's own order puts AES-128-GCM first, and a caller offering
//     only ciphers without forward secrecy is refused.
func TestSidecarTLSParameters(t *testing.T) {
	m := newMesh(t)
	roots, _ := m.consul.RootsPEM(t)
	peer := startTLSPeer(t, m.consul.IssueLeaf(t, "api"), roots)
	registerPeer(t, m.consul, "api", peer.port)
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web", api.Upstream{DestinationName: "api"})
	harness.WaitFor(t, 20*time.Second, "web reaching the peer", func() bool {
		code, body, err := web.call("api")
		return err == nil && code == http.StatusOK && body == "tls peer"
	})
	states := peer.states()
	if len(states) == 0 {
		t.Fatal("the peer recorded no request")
	}
	for _, s := range states {
		if s.Version != tls.VersionTLS12 || s.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 {
			t.Errorf("between sidecars: %s %s, want TLS 1.2 %s", tls.VersionName(s.Version), tls.CipherSuiteName(s.CipherSuite),
				tls.CipherSuiteName(tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256))
		}
	}

	// The inbound listener, from a caller allowed by intention.
	m.consul.SetIntentions(t, "inb", harness.Source("web", api.IntentionActionAllow))
	inb := m.add("inb", "inb-1")
	client := harness.ClientTLS(m.consul.IssueLeaf(t, "web"), roots)
	dial := func(cfg *tls.Config) (tls.ConnectionState, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", fmt.Sprintf("127.0.0.1:%d", inb.port), cfg)
		if err != nil {
			return tls.ConnectionState{}, err
		}
		defer c.Close()
		return c.ConnectionState(), nil
	}
	with := func(max uint16, suites ...uint16) *tls.Config {
		cfg := client.Clone()
		cfg.MaxVersion, cfg.CipherSuites = max, suites
		return cfg
	}
	harness.WaitFor(t, 20*time.Second, "inb's listener", func() bool { _, err := dial(with(tls.VersionTLS13)); return err == nil })
	cases := []struct {
		name    string
		cfg     *tls.Config
		version uint16
		suite   uint16 // 0: refused
	}{
		{"TLS 1.3 offered", with(tls.VersionTLS13), tls.VersionTLS13, tls.TLS_AES_128_GCM_SHA256},
		{"TLS 1.2, AES-256-GCM offered first", with(tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
			tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
		{"TLS 1.2, ChaCha20 only", with(tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
			tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256},
		{"TLS 1.2, no forward secrecy", with(tls.VersionTLS12, tls.TLS_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_256_GCM_SHA384), 0, 0},
		{"TLS 1.2, CBC only", with(tls.VersionTLS12, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA), 0, 0},
	}
	for _, c := range cases {
		s, err := dial(c.cfg)
		switch {
		case c.suite == 0 && err == nil:
			t.Errorf("%s: accepted with %s", c.name, tls.CipherSuiteName(s.CipherSuite))
		case c.suite != 0 && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.suite != 0 && (s.Version != c.version || s.CipherSuite != c.suite):
			t.Errorf("%s: %s %s, want %s %s", c.name, tls.VersionName(s.Version), tls.CipherSuiteName(s.CipherSuite),
				tls.VersionName(c.version), tls.CipherSuiteName(c.suite))
		}
	}
}
