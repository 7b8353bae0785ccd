// The standalone fixture: examples/standalone run as shipped (paths and
// ports moved to the test's), with haconnect-spoa and a real Consul, and
// what the scenarios do with it.

package e2e

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// standalone is the documented "SPOA next to an existing HAProxy" setup
// (examples/standalone), with its paths and ports moved to the test's.
type standalone struct {
	haproxy  *harness.HAProxy
	consul   *harness.Consul
	cutter   *harness.Cutter // between the SPOA and Consul
	dir      string
	inbound  string
	tcp      string // the TCP listener, in front of an echo service
	spoaAddr string
	metrics  string
	spoaArgs []string
	// How the SPOA reaches Consul (through the cutter): flags and
	// environment.
	consulArgs []string
	spoaEnv    []string
	spoa       *harness.Process
	roots      string
	leaves     map[string]*harness.Leaf
}

func startStandalone(t *testing.T, staleWindow time.Duration, extraCAs ...string) *standalone {
	t.Helper()
	return startStandaloneOn(t, harness.StartConsul(t), "", staleWindow, extraCAs...)
}

// startStandaloneOn is startStandalone against consul, the SPOA holding the
// ACL token ("": none).
func startStandaloneOn(t *testing.T, consul *harness.Consul, token string, staleWindow time.Duration, extraCAs ...string) *standalone {
	t.Helper()
	s := &standalone{dir: harness.TempDir(t), leaves: map[string]*harness.Leaf{}, consul: consul}
	s.cutter = harness.NewCutter(t, s.consul.Addr)
	s.roots, _ = s.consul.RootsPEM(t)
	for _, svc := range []string{"api", "web", "batch", "fresh", "stranger", "reports"} {
		s.leaves[svc] = s.consul.IssueLeaf(t, svc)
	}
	api := s.leaves["api"]
	harness.WriteFile(t, s.dir, "leaf.pem", api.CertPEM+api.KeyPEM)
	harness.WriteFile(t, s.dir, "roots.pem", s.roots+strings.Join(extraCAs, ""))

	// The app also answers WebSocket upgrades (wsEcho).
	app := httptest.NewServer(wsEcho(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/headers" { // every header the app received
			_ = r.Header.Write(w)
			return
		}
		fmt.Fprintf(w, "source=%s", r.Header.Get("X-Haconnect-Source"))
	})))
	t.Cleanup(app.Close)

	s.inbound = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	s.tcp = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	s.spoaAddr = filepath.Join(s.dir, "spoa.sock") // the example's unix socket
	s.metrics = fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	replacer := strings.NewReplacer(
		"/etc/haproxy/haconnect", s.dir,
		"127.0.0.1:21000", s.inbound,
		"127.0.0.1:21001", s.tcp,
		"127.0.0.1:9000", fmt.Sprintf("127.0.0.1:%d", startEcho(t)),
		"127.0.0.1:8080", strings.TrimPrefix(app.URL, "http://"),
		"/run/haconnect/spoa.sock", s.spoaAddr,
	)
	cfg := replacer.Replace(readExample(t, "haproxy.cfg"))
	harness.WriteFile(t, s.dir, "spoe.conf", replacer.Replace(readExample(t, "spoe.conf")))
	harness.WriteFile(t, s.dir, "spoe-tcp.conf", replacer.Replace(readExample(t, "spoe-tcp.conf")))

	s.consulArgs = s.consul.Flags(s.cutter.Addr, token)
	s.spoaArgs = []string{"-listen", "unix:" + s.spoaAddr, "-target", "api",
		"-metrics-listen", s.metrics, "-stale-window", staleWindow.String(), "-ttl", "300ms", "-log-level", "debug",
		"-revoke-socket", filepath.Join(s.dir, "admin.sock")}
	s.startSPOA(t)
	s.haproxy = harness.StartHAProxy(t, s.dir, cfg, s.inbound, s.tcp)
	return s
}

func readExample(t *testing.T, name string) string {
	t.Helper()
	return readRepoFile(t, "examples", "standalone", name)
}

// readRepoFile reads a file of the repository, by its path's parts.
func readRepoFile(t *testing.T, parts ...string) string {
	t.Helper()
	return readFile(t, filepath.Join(append([]string{harness.RepoRoot()}, parts...)...))
}

func (s *standalone) startSPOA(t *testing.T) {
	t.Helper()
	s.spoa = harness.StartEnv(t, "haconnect-spoa", s.spoaEnv, harness.Binary(t, "haconnect-spoa"),
		slices.Concat(s.spoaArgs, s.consulArgs)...)
	harness.WaitSocket(t, s.spoaAddr, 10*time.Second)
}

// get makes one request on a new connection as caller (nil: no client
// certificate) and returns the status and body.
func (s *standalone) get(caller *harness.Leaf) (int, string, error) {
	return getOnce(harness.ClientTLS(caller, s.roots), "https://"+s.inbound+"/", 5*time.Second)
}

// getOnce makes one GET on a new connection, with tlsCfg for an https URL,
// and returns the status and body.
func getOnce(tlsCfg *tls.Config, url string, timeout time.Duration) (int, string, error) {
	tr := &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: timeout}).Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

func (s *standalone) mustGet(t *testing.T, caller string) (int, string) {
	t.Helper()
	code, body, err := s.get(s.leaves[caller])
	if err != nil {
		t.Fatalf("request as %s: %v", caller, err)
	}
	return code, body
}

// keepAlive is one client connection reused for many requests.
type keepAlive struct {
	conn *tls.Conn
	r    *bufio.Reader
}

func (s *standalone) dialKeepAlive(t *testing.T, caller string) *keepAlive {
	t.Helper()
	conn, err := tls.Dial("tcp", s.inbound, harness.ClientTLS(s.leaves[caller], s.roots))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &keepAlive{conn: conn, r: bufio.NewReader(conn)}
}

func (k *keepAlive) get(t *testing.T) int {
	t.Helper()
	code, _ := k.do(t, "GET", "/")
	return code
}

// do sends one request on the connection; headers are "Name: value" lines,
// sent as given (a name may repeat).
func (k *keepAlive) do(t *testing.T, method, path string, headers ...string) (int, string) {
	t.Helper()
	req := method + " " + path + " HTTP/1.1\r\nHost: api\r\n"
	for _, h := range headers {
		req += h + "\r\n"
	}
	if _, err := io.WriteString(k.conn, req+"\r\n"); err != nil {
		t.Fatalf("keep-alive write: %v", err)
	}
	resp, err := http.ReadResponse(k.r, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("keep-alive read: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Close {
		t.Fatalf("HAProxy closed the keep-alive connection")
	}
	return resp.StatusCode, string(body)
}

// metric sums the values of name's series whose labels include labels.
func (s *standalone) metric(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	var sum float64
	for _, m := range scrape(t, s.metrics)[name].GetMetric() {
		if hasLabels(m, labels) {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

const (
	allow = api.IntentionActionAllow
	deny  = api.IntentionActionDeny
)
