package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// fakeSidecar is a mesh peer under the test's control: a TLS server that
// requires a client certificate from Consul's CA and presents whichever
// certificate the test sets.
type fakeSidecar struct {
	cert atomic.Pointer[tls.Certificate]
	port int
}

func startFakeSidecar(t *testing.T, rootsPEM string, serve func(net.Listener)) *fakeSidecar {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(rootsPEM))
	f := &fakeSidecar{}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  pool,
		// A resumed session would keep the certificate of the session's
		// first handshake: every connection must show the one set now.
		SessionTicketsDisabled: true,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return f.cert.Load(), nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f.port = l.Addr().(*net.TCPAddr).Port
	go serve(l)
	return f
}

func (f *fakeSidecar) present(l *harness.Leaf) { f.cert.Store(&l.TLS) }

// registerPeer registers the fake sidecar as an instance of service's
// sidecar proxy.
func registerPeer(t *testing.T, c *harness.Consul, service string, port int) {
	t.Helper()
	err := c.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{
		Kind: api.ServiceKindConnectProxy, ID: "fake-" + service + "-sidecar-proxy", Name: service + "-sidecar-proxy",
		Address: "127.0.0.1", Port: port,
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: service, LocalServicePort: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
}

// uriSANBytes is the DER GeneralName that carries uri as a URI SAN, exactly
// as it appears in a certificate naming uri.
func uriSANBytes(uri string) []byte {
	return append([]byte{0x86, byte(len(uri))}, uri...)
}

// impostors are certificates of another service (evil), chain-valid for
// the mesh, that carry the encoded URI SAN of target somewhere else.
func impostors(t *testing.T, ca *harness.ForeignCA, td, target string) map[string]*harness.Leaf {
	t.Helper()
	spiffe := func(svc string) *url.URL {
		u, _ := url.Parse(fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/%s", td, svc))
		return u
	}
	want := uriSANBytes(spiffe(target).String())
	if len(want) > 0x7f {
		t.Fatalf("URI too long for a short-form length: %q", want)
	}
	ec := func() *ecdsa.PrivateKey { k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader); return k }
	seqOf, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: want})
	return map[string]*harness.Leaf{
		"in another extension": ca.SignCrafted(t, &x509.Certificate{URIs: []*url.URL{spiffe("evil")},
			ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 32473, 1}, Value: seqOf}}}, ec()),
		"in the subject": ca.SignCrafted(t, &x509.Certificate{URIs: []*url.URL{spiffe("evil")},
			Subject: pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{{Type: asn1.ObjectIdentifier{2, 5, 4, 10},
				Value: asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagT61String, Bytes: want}}}}}, ec()),
		"in the RSA modulus": ca.SignCrafted(t, &x509.Certificate{URIs: []*url.URL{spiffe("evil")}},
			harness.RSAKeyEmbedding(t, want)),
		"as a second URI SAN": ca.SignCrafted(t, &x509.Certificate{URIs: []*url.URL{spiffe("evil"), spiffe(target)}}, ec()),
	}
}

// TestUpstreamIdentityIsTheURISAN: a sidecar talks to an upstream only if
// the peer's certificate names the upstream in its one URI SAN. Certificates
// chain-valid for the mesh but issued to another service are refused even
// when they carry the upstream's encoded URI SAN elsewhere: in another
// extension, in the subject, inside the RSA modulus, or as a second URI
// SAN. A real Consul leaf of the upstream passes. HTTP upstreams answer
// 502; TCP upstreams are closed before any byte of the peer arrives. Each
// refused certificate is logged once and each refused response counted;
// past a certificate's first response the check is the native map lookup.
func TestUpstreamIdentityIsTheURISAN(t *testing.T) {
	m := newMesh(t)
	ca := m.consul.MeshCA(t)
	roots, td := m.consul.RootsPEM(t)

	api := startFakeSidecar(t, roots, func(l net.Listener) {
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			io.WriteString(w, "fake api")
		})}
		srv.SetKeepAlivesEnabled(false) // each request's handshake shows the certificate set now
		_ = srv.Serve(l)
	})
	db := startFakeSidecar(t, roots, func(l net.Listener) {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	})
	apiLeaf, dbLeaf := m.consul.IssueLeaf(t, "api"), m.consul.IssueLeaf(t, "db")
	api.present(apiLeaf)
	db.present(dbLeaf)
	registerPeer(t, m.consul, "api", api.port)
	registerPeer(t, m.consul, "db", db.port)
	web := m.add("web", "web-1", "api", "db:tcp")

	harness.WaitFor(t, 15*time.Second, "api's Consul leaf accepted", func() bool {
		code, body, err := web.call("api")
		return err == nil && code == 200 && body == "fake api"
	})
	harness.WaitFor(t, 15*time.Second, "db's Consul leaf accepted", func() bool {
		got, err := web.echo("db", "ping")
		return err == nil && got == "ping"
	})

	apiImpostors := impostors(t, ca, td, "api")
	for name, leaf := range apiImpostors {
		api.present(leaf)
		for i := 0; i < 3; i++ { // the first parses, the next ones hit the map
			if code, body, err := web.call("api"); err != nil || code != 502 {
				t.Errorf("api impostor %s, request %d: %d %q %v, want 502", name, i+1, code, body, err)
			}
		}
	}
	for name, leaf := range impostors(t, ca, td, "db") {
		db.present(leaf)
		for i := 0; i < 3; i++ {
			if got, err := web.echo("db", "secret"); err == nil {
				t.Errorf("db impostor %s, connection %d: the peer's %q reached the caller", name, i+1, got)
			}
		}
	}

	// The genuine peers pass again, and the refusals were logged and
	// counted.
	api.present(apiLeaf)
	db.present(dbLeaf)
	if code, body, err := web.call("api"); err != nil || code != 200 || body != "fake api" {
		t.Errorf("api's leaf after the impostors: %d %q %v", code, body, err)
	}
	if got, err := web.echo("db", "ping"); err != nil || got != "ping" {
		t.Errorf("db's leaf after the impostors: %q %v", got, err)
	}
	out := logText(web.sidecar)
	for _, svc := range []string{"api", "db"} {
		// HAProxy prints a warning both to its log and to stderr.
		re := regexp.MustCompile(`upstream certificate ([0-9A-F]+\|.+?) refused: it names ` +
			regexp.QuoteMeta(fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/evil, not spiffe://%s/ns/default/dc/dc1/svc/%s", td, td, svc)))
		certs := map[string]bool{}
		for _, m := range re.FindAllStringSubmatch(out, -1) {
			certs[m[1]] = true
		}
		if len(certs) != 3 {
			t.Errorf("%s: refusals logged for %d certificates naming evil, want 3", svc, len(certs))
		}
	}
	if !strings.Contains(out, "refused: more than one URI SAN") {
		t.Error("no log line for the certificate with two URI SANs")
	}
	for _, b := range []string{"upstream_api", "upstream_db"} {
		if n := deniedResponses(t, web, b); n != 12 {
			t.Errorf("%s: %d denied responses counted, want 12", b, n)
		}
	}

	// Past a certificate's first response, the check is the native map
	// lookup alone: the entry Lua made is keyed by the certificate's
	// serial and issuer, and an entry changed through the runtime API
	// decides the next response, which the Lua parse would have refused.
	evil := apiImpostors["in another extension"]
	key := peerMapKey(t, evil.TLS.Certificate[0])
	mapFile := filepath.Join(web.dir, "upstream_peers.map")
	evilURI := fmt.Sprintf("spiffe://%s/ns/default/dc/dc1/svc/evil", td)
	if entries := web.admin(t, "show map "+mapFile); !strings.Contains(entries, " "+key+" "+evilURI+"\n") {
		t.Fatalf("no entry %s -> %s in the map:\n%s", key, evilURI, entries)
	}
	// (The runtime API splits its arguments at spaces unless escaped.)
	web.admin(t, fmt.Sprintf("set map %s %s spiffe://%s/ns/default/dc/dc1/svc/api", mapFile, strings.ReplaceAll(key, " ", `\ `), td))
	api.present(evil)
	if code, _, err := web.call("api"); err != nil || code != 200 {
		t.Errorf("with the map entry changed: %d %v, want the native lookup's 200", code, err)
	}
}

// deniedResponses reads a backend's denied-responses counter (dresp).
func deniedResponses(t *testing.T, in *instance, backend string) int {
	t.Helper()
	stat := in.admin(t, "show stat "+backend+" 2 -1")
	lines := strings.Split(strings.TrimSpace(stat), "\n")
	if len(lines) < 2 {
		t.Fatalf("show stat %s: %q", backend, stat)
	}
	head := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	row := strings.Split(lines[1], ",")
	for i, h := range head {
		if h == "dresp" && i < len(row) {
			n, _ := strconv.Atoi(row[i])
			return n
		}
	}
	t.Fatalf("no dresp in %q", stat)
	return 0
}

// peerMapKey is the upstream identity map's key of a certificate:
// "<serial, hex upper-case>|<issuer DN as HAProxy's ssl_s_i_dn writes it>".
func peerMapKey(t testing.TB, der []byte) string {
	t.Helper()
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	var dn strings.Builder
	for _, rdn := range cert.Issuer.ToRDNSequence() {
		for _, atv := range rdn {
			name := map[string]string{"2.5.4.3": "CN", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST"}[atv.Type.String()]
			if name == "" {
				t.Fatalf("issuer attribute %s: not named here", atv.Type)
			}
			fmt.Fprintf(&dn, "/%s=%v", name, atv.Value)
		}
	}
	return strings.ToUpper(hex.EncodeToString(cert.SerialNumber.Bytes())) + "|" + dn.String()
}
