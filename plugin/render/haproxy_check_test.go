package render

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/lua"
	"github.com/haconnect/haconnect/spoa/authz"
)

// TestRenderedConfigsPassHAProxyCheck renders HTTP, HTTP/2, gRPC and TCP sidecars and
// has the real HAProxy validate them.
func TestRenderedConfigsPassHAProxyCheck(t *testing.T) {
	bin := harness.HAProxyBinary(t)
	dir := harness.TempDir(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	keyDER, _ := x509.MarshalECPrivateKey(key)
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	harness.WriteFile(t, dir, "leaf.pem", string(cert)+string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})))
	harness.WriteFile(t, dir, "roots.pem", string(cert))

	harness.WriteFile(t, dir, "haconnect.lua", string(lua.Telemetry))
	harness.WriteFile(t, dir, "upstream_peers.map", "")
	for _, proto := range []string{ProtocolHTTP, ProtocolTCP, ProtocolHTTP2, ProtocolGRPC, ProtocolHTTP + " without telemetry",
		ProtocolHTTP + " with rate limits", ProtocolGRPC + " with rate limits", ProtocolTCP + " with rate limits",
		ProtocolHTTP + " with rate limits without telemetry"} {
		m := model()
		m.LeafFile, m.RootsFile = filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
		m.SPOEFile, m.AdminSocket = filepath.Join(dir, "spoe.conf"), filepath.Join(dir, "admin.sock")
		m.AdminBind, m.LuaFile = "127.0.0.1:19000", filepath.Join(dir, "haconnect.lua")
		m.PeerMapFile = filepath.Join(dir, "upstream_peers.map")
		m.LatencyMapFile = harness.WriteFile(t, dir, "latency_buckets.map", m.LatencyMapText())
		if p, ok := strings.CutSuffix(proto, " without telemetry"); ok {
			proto, m.AdminBind = p, ""
		}
		if p, ok := strings.CutSuffix(proto, " with rate limits"); ok {
			proto, m.Inbound.RateLimits = p, sampleRateLimits()
			m.RateLimitMapFile = filepath.Join(dir, "rate_limits.map")
			harness.WriteFile(t, dir, "rate_limits.map", m.RateLimitMapText())
		}
		m.Inbound.Protocol, m.Upstreams[0].Protocol = proto, proto
		m.AccessLog, m.Threads = proto == ProtocolTCP, 1
		// Native L7 matching, with a set loaded (it renders only where
		// it applies: HTTP/1.1 with telemetry).
		m.L7MapDir, m.L7Sets = dir, []*authz.NativeSet{sampleNativeSet()}
		for _, f := range m.L7MapFiles() {
			harness.WriteFile(t, dir, f[0], f[1])
		}
		out, err := Render(m)
		if err != nil {
			t.Fatal(err)
		}
		harness.WriteFile(t, dir, "spoe.conf", out.SPOE)
		cfg := harness.WriteFile(t, dir, "haproxy.cfg", out.Config)
		if b, err := exec.Command(bin, "-c", "-f", cfg).CombinedOutput(); err != nil {
			t.Fatalf("%s: haproxy -c: %v\n%s\n%s", proto, err, b, out.Config)
		}
	}
	_ = os.Remove
}
