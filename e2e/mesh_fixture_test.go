// The mesh fixture: a Consul agent with services registered as Consul users
// do, each with its app and its `haconnect sidecar`, and what the scenarios
// do with them (calls, load, echo streams, HAProxy processes).

package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// mesh is a Consul agent with services registered the way Consul users do
// (a service with a sidecar_service), each proxy run by `haconnect sidecar`.
type mesh struct {
	t      *testing.T
	consul *harness.Consul
}

// instance is one registered service instance with its app and sidecar.
type instance struct {
	id       string
	args     []string // extra sidecar flags
	env      []string // extra sidecar environment
	app      *httptest.Server
	port     int // sidecar's public port
	dir      string
	sidecar  *harness.Process
	upstream map[string]int // destination -> local port
	config   map[string]any // extra Proxy.Config keys of its registration
	// meta is the service's Meta (its sidecar inherits it when it has
	// none of its own, which is what a resolver subset's filter reads).
	meta map[string]string
}

func newMesh(t *testing.T) *mesh {
	return &mesh{t: t, consul: harness.StartConsul(t)}
}

// add registers an instance of service with an HTTP app and starts its
// sidecar. upstreams lists destination services ("name", or "name:tcp" for
// a TCP upstream).
func (m *mesh) add(service, id string, upstreams ...string) *instance {
	m.t.Helper()
	return m.addInstance(&instance{id: id}, service, upstreams...)
}

// addInstance is add for an instance given its extra sidecar flags and
// environment (args, env).
func (m *mesh) addInstance(in *instance, service string, upstreams ...string) *instance {
	m.t.Helper()
	return m.addWithUpstreams(in, service, upstreamsOf(upstreams)...)
}

// addWithUpstreams is addInstance for upstreams given as Consul writes them
// (a datacenter, say); in.upstream is keyed by "name" or "name@datacenter".
func (m *mesh) addWithUpstreams(in *instance, service string, upstreams ...api.Upstream) *instance {
	t := m.t
	t.Helper()
	id := in.id
	in.app = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s source=%s", id, r.Header.Get("X-Haconnect-Source"))
	}))
	t.Cleanup(in.app.Close)
	return m.registerProxy(in, service, "http", in.app.Listener.Addr().(*net.TCPAddr).Port, upstreams)
}

// register registers in (whose app listens on appPort) and starts its
// sidecar.
func (m *mesh) register(in *instance, service, protocol string, appPort int, upstreams ...string) *instance {
	m.t.Helper()
	return m.registerProxy(in, service, protocol, appPort, upstreamsOf(upstreams))
}

// upstreamsOf reads upstreams written "name" or "name:tcp".
func upstreamsOf(specs []string) []api.Upstream {
	var ups []api.Upstream
	for _, u := range specs {
		name, proto, _ := strings.Cut(u, ":")
		if proto == "" {
			proto = "http"
		}
		ups = append(ups, api.Upstream{DestinationName: name, Config: map[string]any{"protocol": proto}})
	}
	return ups
}

// registerProxy registers in with its sidecar and upstreams (each given a
// free local port; an upstream without a protocol is http) and starts the
// sidecar.
func (m *mesh) registerProxy(in *instance, service, protocol string, appPort int, ups []api.Upstream) *instance {
	t := m.t
	t.Helper()
	id := in.id
	in.port, in.dir = harness.FreePort(t), harness.TempDir(t)
	if in.upstream == nil {
		in.upstream = map[string]int{}
	}
	for i := range ups {
		u := &ups[i]
		key := u.DestinationName
		if u.Datacenter != "" {
			key += "@" + u.Datacenter
		}
		u.LocalBindPort = harness.FreePort(t)
		in.upstream[key] = u.LocalBindPort
		if u.Config == nil {
			u.Config = map[string]any{"protocol": "http"}
		}
	}
	config := map[string]any{"protocol": protocol, "bind_address": "127.0.0.1"}
	maps.Copy(config, in.config)
	reg := &api.AgentServiceRegistration{
		ID: id, Name: service, Address: "127.0.0.1", Port: appPort, Meta: in.meta,
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: in.port,
			Proxy: &api.AgentServiceConnectProxyConfig{
				Config:    config,
				Upstreams: ups,
			},
			Checks: listeningCheck(in.port),
		}},
	}
	if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
	in.sidecar = harness.StartEnv(t, "sidecar "+id, in.env, harness.Binary(t, "haconnect"), slices.Concat([]string{"sidecar",
		"-sidecar-for", id, "-dir", in.dir, "-ttl", "300ms", "-stop-grace", "2s", "-log-level", "debug"},
		m.consul.Flags(m.consul.Addr, ""), in.args)...)
	in.waitReady(t)
	return in
}

// waitReady waits until in's HAProxy listens on its public and upstream
// ports and answers on its admin socket. HAProxy's master binds the TCP
// ports a moment before the admin socket exists, so the ports alone do not
// say that the socket is there.
func (in *instance) waitReady(t testing.TB) {
	t.Helper()
	harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", in.port), 20*time.Second)
	for _, p := range in.upstream {
		harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", p), 20*time.Second)
	}
	harness.WaitFor(t, 20*time.Second, in.id+"'s admin socket", func() bool {
		_, err := haproxy.NewAdmin(filepath.Join(in.dir, "admin.sock")).Command("show info")
		return err == nil
	})
}

// call makes one request from in's app to destination through the sidecar.
func (in *instance) call(dest string) (int, string, error) { return in.callPath(dest, "/") }

func (in *instance) callPath(dest, path string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", in.upstream[dest], path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// admin asks in's HAProxy a runtime API question.
func (in *instance) admin(t testing.TB, cmd string) string {
	t.Helper()
	out, err := haproxy.NewAdmin(filepath.Join(in.dir, "admin.sock")).Command(cmd)
	if err != nil {
		t.Fatalf("admin socket: %v", err)
	}
	return out
}

// inPool reports whether in's HAProxy has an active server on port in its
// upstream api.
func (in *instance) inPool(t testing.TB, port int) bool {
	t.Helper()
	return serverActive(in.admin(t, "show stat upstream_api 4 -1"), port)
}

// load calls dest from in with workers keep-alive clients until stop is
// closed, counting outcomes by instance and failures.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	byBody     map[string]int
	errs       []string
	wg         sync.WaitGroup
	stop       chan struct{}
}

func startLoad(in *instance, dest string, workers int) *load {
	l := &load{byBody: map[string]int{}, stop: make(chan struct{})}
	for i := 0; i < workers; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			c := &http.Client{Timeout: 5 * time.Second}
			url := fmt.Sprintf("http://127.0.0.1:%d/", in.upstream[dest])
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				resp, err := c.Get(url)
				if err != nil {
					l.fail(err.Error())
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					l.fail(fmt.Sprintf("%d %s", resp.StatusCode, b))
					continue
				}
				l.ok.Add(1)
				id, _, _ := strings.Cut(string(b), " ")
				l.mu.Lock()
				l.byBody[id]++
				l.mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *load) fail(msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	if len(l.errs) < 5 {
		l.errs = append(l.errs, msg)
	}
	l.mu.Unlock()
}

func (l *load) finish() { close(l.stop); l.wg.Wait() }

func (l *load) check(t *testing.T, what string) {
	t.Helper()
	t.Logf("%s: %d requests ok, %d failed, by instance %v", what, l.ok.Load(), l.failed.Load(), l.byBody)
	if l.failed.Load() > 0 {
		t.Fatalf("%s: %d requests failed, e.g. %v", what, l.failed.Load(), l.errs)
	}
	if l.ok.Load() == 0 {
		t.Fatalf("%s: no request succeeded", what)
	}
}

func serverActive(stat string, port int) bool {
	for _, line := range strings.Split(stat, "\n") {
		f := strings.Split(line, ",")
		if len(f) > 73 && strings.HasSuffix(f[73], fmt.Sprintf(":%d", port)) {
			return !strings.HasPrefix(f[17], "MAINT")
		}
	}
	return false
}

// startEcho serves a TCP echo app and returns its port.
func startEcho(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// echo sends a line through in's upstream to dest and returns what came
// back (an error when the mesh refused).
func (in *instance) echo(dest, line string) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", in.upstream[dest]), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	buf := make([]byte, len(line)+1)
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return strings.TrimSpace(string(buf)), nil
}

func workerPid(t testing.TB, dir string) int {
	t.Helper()
	pid, err := haproxy.NewAdmin(filepath.Join(dir, "admin.sock")).WorkerPid()
	if err != nil || pid == 0 {
		t.Fatalf("no worker pid from the admin socket: %d %v", pid, err)
	}
	return pid
}

// parentOf reads a process's parent pid from /proc.
func parentOf(t testing.TB, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	_, after, _ := strings.Cut(string(b), ") ")
	var state string
	var ppid int
	fmt.Sscan(after, &state, &ppid)
	return ppid
}

// alive reports whether pid runs (a zombie waiting for its reaper does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, after, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(after, "Z")
}

// rotateCA gives Consul's built-in CA provider a new root key: the
// Connect CA root rotates, and Consul re-issues every leaf (seconds later).
func (m *mesh) rotateCA(t *testing.T) {
	t.Helper()
	conf, _, err := m.consul.Client.Connect().CAGetConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	conf.Config["PrivateKey"] = newRootKey(t)
	conf.Config["RootCert"] = ""
	if _, err := m.consul.Client.Connect().CASetConfig(conf, nil); err != nil {
		t.Fatalf("rotate the CA: %v", err)
	}
}

// waitServingLeaf waits until in's public listener serves the leaf now in
// in's directory, as a caller holding caller's leaf sees it, and returns
// the serial number served last.
func (in *instance) waitServingLeaf(t *testing.T, timeout time.Duration, caller *instance) *big.Int {
	t.Helper()
	want := pemCert(t, readFile(t, filepath.Join(in.dir, "leaf.pem")))
	var served *big.Int
	harness.WaitFor(t, timeout, in.id+"'s listener serving its new leaf", func() bool {
		callerPEM := readFile(t, filepath.Join(caller.dir, "leaf.pem"))
		cert, err := tls.X509KeyPair([]byte(callerPEM), []byte(callerPEM))
		if err != nil {
			return false
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", fmt.Sprintf("127.0.0.1:%d", in.port),
			&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
		if err != nil {
			return false
		}
		defer c.Close()
		served = c.ConnectionState().PeerCertificates[0].SerialNumber
		return served.Cmp(want.SerialNumber) == 0
	})
	return served
}

// newRootKey is a fresh CA key for Consul's built-in provider: giving it
// one rotates the Connect CA root.
func newRootKey(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// listeningCheck is a sidecar's health check: its public port accepts
// connections. Consul's default for a sidecar checks every 10s, after a
// random first delay, so a proxy that starts after the first run stays out
// of its callers' pools for up to 10s more; checking every second
// (Consul's minimum) keeps that short.
func listeningCheck(port int) api.AgentServiceChecks {
	return api.AgentServiceChecks{{
		Name: "Connect Sidecar Listening", TCP: fmt.Sprintf("127.0.0.1:%d", port),
		Interval: "1s", Timeout: "200ms",
	}}
}
