package haproxy

import (
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestCertificateCommittedAfterACAFile commits a certificate, a CA file,
// then a certificate again in a real HAProxy whose listener and server use
// both, as the sidecar's configuration does, and asks the listener which
// certificate it serves. HAProxy 2.6.12 rebuilds nothing on the second
// certificate commit (its answer has no dot) and answers "Success!" while
// it goes on serving the first: Runtime must report that as an error, so
// that the sidecar reloads instead.
func TestCertificateCommittedAfterACAFile(t *testing.T) {
	dir := testDir(t)
	ca := harness.NewForeignCA(t)
	leaf0, leaf1, leaf2 := ca.IssueHost(t, "leaf-0"), ca.IssueHost(t, "leaf-1"), ca.IssueHost(t, "leaf-2")
	client := ca.IssueHost(t, "client")
	leafFile, rootsFile := filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	for f, data := range map[string]string{leafFile: leaf0.CertPEM + leaf0.KeyPEM, rootsFile: ca.CertPEM} {
		if err := WriteFileAtomic(f, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	port := harness.FreePort(t)
	admin := filepath.Join(dir, "admin.sock")
	text := fmt.Sprintf(`global
    stats socket %s mode 600 level admin expose-fd listeners
defaults
    mode tcp
    timeout client 30s
    timeout connect 2s
    timeout server 30s
frontend fe_tls
    bind 127.0.0.1:%d ssl crt %s ca-file %s verify required
    default_backend be
backend be
    server s0 127.0.0.1:1 ssl crt %s ca-file %s verify required disabled
`, admin, port, leafFile, rootsFile, leafFile, rootsFile)
	startForTest(t, dir, admin, text)
	a := NewAdmin(admin)
	served := func() string {
		t.Helper()
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", "127.0.0.1:"+strconv.Itoa(port),
			&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{client.TLS}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}

	// Before any CA file commit, a certificate commit rebuilds the
	// listener and the server (two dots) and the new one is served.
	out, err := a.Command("set ssl cert " + leafFile + " <<\n" + leaf1.CertPEM + leaf1.KeyPEM)
	if err != nil || runtimeError(out) != "" {
		t.Fatalf("set ssl cert: %q %v", out, err)
	}
	out, err = a.Command("commit ssl cert " + leafFile)
	if err != nil || !strings.HasPrefix(out, "Committing "+leafFile+"..\n") {
		t.Fatalf("commit ssl cert: %q %v, want two instances rebuilt", out, err)
	}
	if cn := served(); cn != "leaf-1" {
		t.Fatalf("after the first certificate commit HAProxy serves %s", cn)
	}
	if err := a.Runtime(SetSSLCAFile(rootsFile, ca.CertPEM), CommitSSLCAFile(rootsFile)); err != nil {
		t.Fatal(err)
	}

	// After it: Runtime says what HAProxy serves.
	err = a.Runtime(SetSSLCert(leafFile, leaf2.CertPEM+leaf2.KeyPEM), CommitSSLCert(leafFile))
	cn := served()
	t.Logf("a certificate committed after a CA file: Runtime: %v; HAProxy serves %s", err, cn)
	if (err == nil) != (cn == "leaf-2") {
		t.Fatalf("Runtime says %v, HAProxy serves %s", err, cn)
	}
}
