package lua

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// probe registers lua.probe_uri_san: haconnect_uri_san applied to the
// base64 DER of the request's x-der header, as "uri <URI>" or
// "refused <reason>". A Lua error gives an empty answer.
const probe = `
core.register_fetches("probe_uri_san", function(txn)
  local der = txn.c:b64dec(txn.f:req_fhdr("x-der") or "")
  local uri, why = haconnect_uri_san(der)
  if uri then
    return "uri " .. uri
  end
  return "refused " .. tostring(why)
end)
`

// parser is a real HAProxy running haconnect.lua's certificate parser
// behind the probe.
type parser struct {
	t    *testing.T
	h    *harness.HAProxy
	addr string
	c    *http.Client
}

func startParser(t *testing.T) *parser {
	dir := harness.TempDir(t)
	main := harness.WriteFile(t, dir, "haconnect.lua", string(Telemetry))
	pr := harness.WriteFile(t, dir, "probe.lua", probe)
	addr := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	h := harness.StartHAProxy(t, dir, fmt.Sprintf(`global
    nbthread 2
    lua-load-per-thread %s
    lua-load-per-thread %s
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend probe
    bind %s
    http-request return status 200 content-type text/plain lf-string "%%[lua.probe_uri_san]"
`, main, pr, addr), addr)
	return &parser{t: t, h: h, addr: addr, c: &http.Client{Timeout: 5 * time.Second}}
}

// parse returns the probe's answer for der.
func (p *parser) parse(der []byte) string {
	p.t.Helper()
	req, _ := http.NewRequest("GET", "http://"+p.addr+"/", nil)
	req.Header.Set("x-der", base64.StdEncoding.EncodeToString(der))
	resp, err := p.c.Do(req)
	if err != nil {
		p.t.Fatalf("HAProxy did not answer (%v); exited: %v", err, p.h.Proc.Exited())
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// DER building blocks, so that the tests can write any structure, broken
// ones included.
func tlv(tag byte, parts ...[]byte) []byte {
	body := bytes.Join(parts, nil)
	n := len(body)
	out := []byte{tag}
	switch {
	case n < 0x80:
		out = append(out, byte(n))
	case n < 0x100:
		out = append(out, 0x81, byte(n))
	default:
		out = append(out, 0x82, byte(n>>8), byte(n))
	}
	return append(out, body...)
}

var (
	oidSAN     = []byte{0x55, 0x1d, 0x11}
	oidOther   = []byte{0x2a, 0x03, 0x04}                                            // 1.2.3.4
	ecdsaSHA   = tlv(0x30, tlv(0x06, []byte{0x2a, 0x86, 0x48, 0xce, 0x3d, 4, 3, 2})) // ecdsa-with-SHA256
	emptyName  = tlv(0x30)
	validity   = tlv(0x30, tlv(0x17, []byte("260101000000Z")), tlv(0x17, []byte("270101000000Z")))
	spki       = tlv(0x30, ecdsaSHA, tlv(0x03, []byte{0, 4, 1, 2, 3}))
	v3         = tlv(0xa0, tlv(0x02, []byte{2}))
	sigValue   = tlv(0x03, []byte{0, 1, 2, 3})
	apiURI     = "spiffe://td.consul/ns/default/dc/dc1/svc/api"
	evilURI    = "spiffe://td.consul/ns/default/dc/dc1/svc/evil"
	uriName    = func(u string) []byte { return tlv(0x86, []byte(u)) }
	dnsName    = func(d string) []byte { return tlv(0x82, []byte(d)) }
	critical   = tlv(0x01, []byte{0xff})
	sanOf      = func(names ...[]byte) []byte { return ext(oidSAN, true, tlv(0x30, names...)) }
	extensions = func(exts ...[]byte) []byte { return tlv(0xa3, tlv(0x30, exts...)) }
)

func ext(oid []byte, crit bool, value []byte) []byte {
	if crit {
		return tlv(0x30, tlv(0x06, oid), critical, tlv(0x04, value))
	}
	return tlv(0x30, tlv(0x06, oid), tlv(0x04, value))
}

// cert assembles a certificate whose tbsCertificate ends with tail (the
// optional unique IDs and the extensions).
func cert(tail ...[]byte) []byte {
	tbs := tlv(0x30, append([][]byte{v3, tlv(0x02, []byte{1}), ecdsaSHA, emptyName, validity, emptyName, spki}, tail...)...)
	return tlv(0x30, tbs, ecdsaSHA, sigValue)
}

// TestURISANParserFailsClosed runs the DER parser inside HAProxy against
// well-formed and malformed certificates: it must return the single URI
// SAN of the subjectAltName extension and refuse everything else, without
// a Lua error and without bringing HAProxy down.
func TestURISANParserFailsClosed(t *testing.T) {
	p := startParser(t)
	good := cert(extensions(sanOf(uriName(apiURI))))
	apiSAN := uriName(apiURI)

	cases := []struct {
		name string
		der  []byte
		want string // "uri <URI>" or the start of "refused <reason>"
	}{
		{"one URI SAN", good, "uri " + apiURI},
		{"URI beside DNS names, non-critical", cert(extensions(ext(oidSAN, false, tlv(0x30, dnsName("a.example"), uriName(apiURI), dnsName("b"))))), "uri " + apiURI},
		{"unique IDs before the extensions", cert(tlv(0x81, []byte{0, 1}), tlv(0x82, []byte{0, 2}), extensions(sanOf(uriName(apiURI)))), "uri " + apiURI},
		{"api's SAN bytes in another extension", cert(extensions(ext(oidOther, false, tlv(0x30, apiSAN)), sanOf(uriName(evilURI)))), "uri " + evilURI},
		{"api's SAN bytes only in another extension", cert(extensions(ext(oidOther, false, tlv(0x30, apiSAN)))), "refused no subjectAltName extension"},
		{"two URI SANs", cert(extensions(sanOf(uriName(evilURI), uriName(apiURI)))), "refused more than one URI SAN"},
		{"two subjectAltName extensions", cert(extensions(sanOf(uriName(evilURI)), sanOf(uriName(apiURI)))), "refused two subjectAltName extensions"},
		{"no URI SAN", cert(extensions(sanOf(dnsName("api")))), "refused no URI SAN"},
		{"empty subjectAltName", cert(extensions(sanOf())), "refused subjectAltName is not a non-empty SEQUENCE"},
		{"no extensions", cert(), "refused no extensions"},
		{"empty extensions", cert(extensions()), "refused no subjectAltName extension"},
		{"URI with a NUL", cert(extensions(sanOf(uriName(apiURI + "\x00evil")))), "refused URI SAN with bytes"},
		{"URI with a space", cert(extensions(sanOf(uriName(apiURI + " x")))), "refused URI SAN with bytes"},
		{"empty URI", cert(extensions(sanOf(uriName("")))), "refused URI SAN with bytes"},
		{"constructed URI", cert(extensions(sanOf(tlv(0xa6, apiSAN)))), "refused constructed URI name"},
		{"universal tag among the names", cert(extensions(sanOf(tlv(0x16, []byte(apiURI))))), "refused malformed GeneralName"},
		{"version 1", func() []byte {
			tbs := tlv(0x30, tlv(0x02, []byte{1}), ecdsaSHA, emptyName, validity, emptyName, spki, extensions(sanOf(apiSAN)))
			return tlv(0x30, tbs, ecdsaSHA, sigValue)
		}(), "refused not an X.509 v3"},
		{"extensions not last", cert(extensions(sanOf(apiSAN)), tlv(0x05)), "refused no extensions"},
		{"garbage after the certificate", append(append([]byte{}, good...), 0), "refused not one DER SEQUENCE"},
		{"no signature", func() []byte {
			tbs := tlv(0x30, v3, tlv(0x02, []byte{1}), ecdsaSHA, emptyName, validity, emptyName, spki, extensions(sanOf(apiSAN)))
			return tlv(0x30, tbs, ecdsaSHA)
		}(), "refused malformed signature"},
		{"indefinite length", append([]byte{0x30, 0x80}, append(good[2:], 0, 0)...), "refused not one DER SEQUENCE"},
		{"non-minimal length", func() []byte {
			// A SAN whose GeneralNames length is written in long form
			// although it is below 128.
			names := uriName("spiffe://a/b")
			return cert(extensions(ext(oidSAN, true, append([]byte{0x30, 0x81, byte(len(names))}, names...))))
		}(), "refused subjectAltName is not a non-empty SEQUENCE"},
		{"length with a leading zero", func() []byte {
			names := tlv(0x30, uriName(apiURI))
			return cert(extensions(ext(oidSAN, true, append([]byte{0x30, 0x82, 0x00, byte(len(names) - 2)}, names[2:]...))))
		}(), "refused subjectAltName is not a non-empty SEQUENCE"},
		{"high tag number", cert(extensions(sanOf(tlv(0x9f, apiSAN)))), "refused malformed GeneralName"},
		{"empty input", nil, "refused no certificate"},
		{"not DER", []byte("-----BEGIN CERTIFICATE-----"), "refused not one DER SEQUENCE"},
	}
	for _, tc := range cases {
		if got := p.parse(tc.der); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}

	// Every truncation is refused.
	for n := 0; n < len(good); n++ {
		if got := p.parse(good[:n]); !strings.HasPrefix(got, "refused ") {
			t.Fatalf("truncated to %d of %d bytes: got %q", n, len(good), got)
		}
	}
	// Every byte changed by +1 and -1 (tags and lengths included): either
	// refused, or the same URI, or a different URI because the byte was
	// one of the URI's own.
	uriAt := bytes.Index(good, []byte(apiURI))
	for i := range good {
		for _, d := range []byte{1, 0xff} {
			bad := append([]byte{}, good...)
			bad[i] += d
			got := p.parse(bad)
			inURI := i >= uriAt && i < uriAt+len(apiURI)
			switch {
			case strings.HasPrefix(got, "refused "), got == "uri "+apiURI && !inURI:
			case strings.HasPrefix(got, "uri ") && inURI && got != "uri "+apiURI:
			default:
				t.Fatalf("byte %d changed by %d: got %q", i, int8(d), got)
			}
		}
	}
	// Random damage: any answer must be a clean one.
	rnd := mrand.New(mrand.NewPCG(1, 2))
	for range 300 {
		bad := append([]byte{}, good...)
		for range 1 + rnd.IntN(4) {
			bad[rnd.IntN(len(bad))] = byte(rnd.IntN(256))
		}
		if got := p.parse(bad); !strings.HasPrefix(got, "refused ") && !strings.HasPrefix(got, "uri ") {
			t.Fatalf("damaged %x: got %q", bad, got)
		}
	}

	// A certificate as Go's x509 (and Consul's CA) writes it.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(apiURI)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u}}
	real, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.parse(real); got != "uri "+apiURI {
		t.Errorf("Go-made certificate: got %q", got)
	}

	if p.h.Proc.Exited() {
		t.Fatal("HAProxy exited")
	}
	if out := p.h.Proc.Output(); strings.Contains(out, "runtime error") || strings.Contains(out, "Lua") {
		t.Fatalf("HAProxy reported Lua errors:\n%s", out)
	}
}
