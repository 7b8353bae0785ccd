// The cluster fixture: docker-compose.cluster.yml run as a project of its
// own on a private network the test creates (three Consul servers, three
// nodes each with a client agent, an app and its haconnect sidecar), the
// faults done to it through the Docker engine (stop a container, restart
// it, disconnect a node from the network), and a load that counts every
// request, by kind of failure and by the api instance that answered.

package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"
	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// The cluster's services (docker-compose.cluster.yml) and their addresses'
// last octet on the cluster network.
var (
	clusterServers = []string{"consul-server-1", "consul-server-2", "consul-server-3"}
	clusterHosts   = map[string]int{"consul-server-1": 11, "consul-server-2": 12, "consul-server-3": 13,
		"web": 21, "api-1": 22, "api-2": 23}
)

// cluster is one running docker-compose.cluster.yml project.
type cluster struct {
	t       *testing.T
	cli     *client.Client
	project string
	net     string // the cluster network's /24, first three octets
	netID   string
	compose func(args ...string) (string, error)
	// leaves of identities the test itself holds (services with no
	// sidecar): probe calls the api instances directly; flip is the
	// caller whose intention the scenarios change.
	probe, flip *harness.Leaf
	roots       *rootsPool
	stopped     map[string]bool // servers stopped by the test
}

// startCluster brings the cluster up with the sidecars' stale window, waits
// until web reaches both api instances through the mesh, writes the
// intentions (web, probe and flip may call api; nobody else), and tears it
// all down when the test ends, checking that nothing is left.
func startCluster(t *testing.T, staleWindow time.Duration) *cluster {
	t.Helper()
	cli := harness.Docker(t)
	harness.Images(t)
	reapClusters(t, cli)
	c := &cluster{t: t, cli: cli, stopped: map[string]bool{}, project: fmt.Sprintf("%s%d-%d", clusterProjectPrefix, os.Getpid(), rand.IntN(1e6))}
	c.net = freeClusterNet(t, cli)
	env := append(os.Environ(), "HACONNECT_CLUSTER_NET="+c.net,
		fmt.Sprintf("HACONNECT_CLUSTER_CONSUL_PORT=%d", harness.FreePort(t)),
		fmt.Sprintf("HACONNECT_CLUSTER_WEB_PORT=%d", harness.FreePort(t)),
		"HACONNECT_CLUSTER_STALE_WINDOW="+staleWindow.String())
	base := composeCommand(t)
	c.compose = func(args ...string) (string, error) {
		cmd := exec.Command(base[0], append(append(base[1:], "-p", c.project, "-f", "docker-compose.cluster.yml"), args...)...)
		cmd.Dir, cmd.Env = harness.RepoRoot(), env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.compose("logs", "--no-color", "--tail", "60")
			t.Logf("cluster logs:\n%s", out)
		}
		c.down()
	})
	started := time.Now()
	if out, err := c.compose("up", "-d"); err != nil {
		t.Fatalf("compose up: %v\n%s", err, out)
	}
	nets, err := cli.NetworkList(context.Background(), network.ListOptions{Filters: c.labels()})
	if err != nil || len(nets) != 1 {
		t.Fatalf("the cluster's network: %v (%d found)", err, len(nets))
	}
	c.netID = nets[0].ID

	harness.WaitFor(t, 90*time.Second, "a leader and the Connect CA", func() bool {
		roots, _, err := c.server("consul-server-1").Agent().ConnectCARoots(nil)
		return err == nil && len(roots.Roots) > 0
	})
	seen := map[string]bool{}
	harness.WaitFor(t, 120*time.Second, "web -> api-1 and api-2 through the mesh", func() bool {
		a := c.call(reuseClient(), "GET")
		if a.ok() {
			seen[a.id] = true
		}
		return seen["api-1"] && seen["api-2"]
	})
	c.setIntentions(t, api.IntentionActionAllow)
	agent := &harness.Consul{Addr: c.addr("web", 8500), Client: c.agent("web")}
	c.probe, c.flip = agent.IssueLeaf(t, "probe"), agent.IssueLeaf(t, "flip")
	c.roots = &rootsPool{c: c}
	for _, node := range []string{"api-1", "api-2"} {
		harness.WaitFor(t, 30*time.Second, "probe and flip allowed at "+node, func() bool {
			return c.inbound(node, c.probe).code == 200 && c.inbound(node, c.flip).code == 200
		})
	}
	t.Logf("cluster %s up on %s.0/24 in %v", c.project, c.net, time.Since(started).Round(100*time.Millisecond))
	return c
}

// clusterProjectPrefix starts the compose project of every cluster a test
// starts, followed by the test process's pid.
const clusterProjectPrefix = "haconnect-cluster-test-"

// reapClusters removes what is left of clusters whose test process is gone
// (a test killed by go test's timeout runs no cleanup): their containers,
// networks and volumes. Clusters of running processes are left alone, and
// so is a user's `haconnect-cluster` project.
func reapClusters(t *testing.T, cli *client.Client) {
	t.Helper()
	ctx := context.Background()
	ctrs, err := cli.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("label", "com.docker.compose.project"))})
	if err != nil {
		t.Fatal(err)
	}
	dead := map[string]bool{}
	for _, ctr := range ctrs {
		project := ctr.Labels["com.docker.compose.project"]
		rest, ok := strings.CutPrefix(project, clusterProjectPrefix)
		pid, _, _ := strings.Cut(rest, "-")
		var n int
		if _, err := fmt.Sscanf(pid, "%d", &n); ok && err == nil && !alive(n) {
			dead[project] = true
		}
	}
	for project := range dead {
		label := filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+project))
		ctrs, _ := cli.ContainerList(ctx, container.ListOptions{All: true, Filters: label})
		for _, ctr := range ctrs {
			_ = cli.ContainerRemove(ctx, ctr.ID, container.RemoveOptions{Force: true, RemoveVolumes: true})
		}
		nets, _ := cli.NetworkList(ctx, network.ListOptions{Filters: label})
		for _, n := range nets {
			_ = cli.NetworkRemove(ctx, n.ID)
		}
		vols, _ := cli.VolumeList(ctx, volume.ListOptions{Filters: label})
		for _, v := range vols.Volumes {
			_ = cli.VolumeRemove(ctx, v.Name, true)
		}
		t.Logf("removed the cluster %s left by a test process that is gone", project)
	}
}

// freeClusterNet picks a /24 in 10.87.100-249.0 that no Docker network uses.
func freeClusterNet(t *testing.T, cli *client.Client) string {
	t.Helper()
	nets, err := cli.NetworkList(context.Background(), network.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	used := map[string]bool{}
	for _, n := range nets {
		for _, cfg := range n.IPAM.Config {
			used[cfg.Subnet] = true
		}
	}
	for range 200 {
		prefix := fmt.Sprintf("10.87.%d", 100+rand.IntN(150))
		if !used[prefix+".0/24"] {
			return prefix
		}
	}
	t.Fatal("no free /24 in 10.87.100-249.0 for the cluster network")
	return ""
}

func (c *cluster) labels() filters.Args {
	return filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+c.project))
}

// down removes the project (containers, network, volumes) and checks that
// nothing of it is left.
func (c *cluster) down() {
	t := c.t
	if out, err := c.compose("down", "-v", "--remove-orphans", "-t", "3"); err != nil {
		t.Errorf("compose down: %v\n%s", err, out)
	}
	ctx := context.Background()
	ctrs, _ := c.cli.ContainerList(ctx, container.ListOptions{All: true, Filters: c.labels()})
	nets, _ := c.cli.NetworkList(ctx, network.ListOptions{Filters: c.labels()})
	vols, _ := c.cli.VolumeList(ctx, volume.ListOptions{Filters: c.labels()})
	if len(ctrs)+len(nets)+len(vols.Volumes) > 0 {
		t.Errorf("left after compose down: %d containers, %d networks, %d volumes", len(ctrs), len(nets), len(vols.Volumes))
	}
}

// ip is a host's address on the cluster network; addr, one of its ports.
func (c *cluster) ip(host string) string { return fmt.Sprintf("%s.%d", c.net, clusterHosts[host]) }
func (c *cluster) addr(host string, port int) string {
	return net.JoinHostPort(c.ip(host), fmt.Sprint(port))
}

// container is the ID of the container running a compose service.
func (c *cluster) container(service string) string {
	c.t.Helper()
	f := c.labels()
	f.Add("label", "com.docker.compose.service="+service)
	ctrs, err := c.cli.ContainerList(context.Background(), container.ListOptions{All: true, Filters: f})
	if err != nil || len(ctrs) != 1 {
		c.t.Fatalf("container of %s: %v (%d found)", service, err, len(ctrs))
	}
	return ctrs[0].ID
}

// consulAt is a Consul client for the agent (server or client) on host,
// with short timeouts: its servers may be gone.
func consulAt(addr string) *api.Client { return consulWithin(addr, 5*time.Second) }

func consulWithin(addr string, timeout time.Duration) *api.Client {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	cfg.HttpClient = &http.Client{Timeout: timeout}
	cl, _ := api.NewClient(cfg)
	return cl
}

func (c *cluster) server(name string) *api.Client { return consulAt(c.addr(name, 8500)) }

// quick is consulAt with a one-second timeout, for polls.
func quick(addr string) *api.Client { return consulWithin(addr, time.Second) }

// running lists the servers the test has not stopped.
func (c *cluster) running() []string {
	var out []string
	for _, s := range clusterServers {
		if !c.stopped[s] {
			out = append(out, s)
		}
	}
	return out
}

// logs is the output of a compose service's container.
func (c *cluster) logs(service string) string {
	out, _ := c.compose("logs", "--no-color", service)
	return out
}
func (c *cluster) agent(node string) *api.Client { return consulAt(c.addr(node, 8500)) }

// leader is the server that leads Raft now, as a running server sees it
// ("" when none answers with a leader).
func (c *cluster) leader() string {
	for _, s := range c.running() {
		l, err := quick(c.addr(s, 8500)).Status().Leader()
		if err != nil || l == "" {
			continue
		}
		host, _, _ := net.SplitHostPort(l)
		for _, name := range clusterServers {
			if c.ip(name) == host {
				return name
			}
		}
	}
	return ""
}

// trySetIntentions writes api's intentions (web and probe allowed, flip as
// given, anyone else denied) through the first running server that takes
// the write, and returns an error if none does; setIntentions fails the
// test then.
func (c *cluster) trySetIntentions(flip api.IntentionAction) error {
	entry := &api.ServiceIntentionsConfigEntry{Kind: api.ServiceIntentions, Name: "api", Sources: []*api.SourceIntention{
		harness.Source("web", api.IntentionActionAllow), harness.Source("probe", api.IntentionActionAllow),
		harness.Source("flip", flip), harness.Source("*", api.IntentionActionDeny)}}
	var errs []error
	for _, s := range c.running() {
		ok, _, err := c.server(s).ConfigEntries().Set(entry, nil)
		if err == nil && ok {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: ok=%v %v", s, ok, err))
	}
	return errors.Join(errs...)
}

func (c *cluster) setIntentions(t testing.TB, flip api.IntentionAction) {
	t.Helper()
	if err := c.trySetIntentions(flip); err != nil {
		t.Fatalf("set api's intentions: %v", err)
	}
}

// The faults, through the Docker engine.

// stop stops services' containers at the same time, as `docker stop`.
func (c *cluster) stop(services ...string) {
	c.t.Helper()
	ids := make([]string, len(services))
	for i, s := range services {
		ids[i] = c.container(s)
	}
	errs := make([]error, len(services))
	var wg sync.WaitGroup
	for i := range services {
		wg.Go(func() {
			timeout := 5
			errs[i] = c.cli.ContainerStop(context.Background(), ids[i], container.StopOptions{Timeout: &timeout})
		})
	}
	wg.Wait()
	for i, s := range services {
		if errs[i] != nil {
			c.t.Fatalf("stop %s: %v", s, errs[i])
		}
		c.stopped[s] = true
	}
}

func (c *cluster) start(service string) {
	c.t.Helper()
	if err := c.cli.ContainerStart(context.Background(), c.container(service), container.StartOptions{}); err != nil {
		c.t.Fatalf("start %s: %v", service, err)
	}
	delete(c.stopped, service)
}

func (c *cluster) restart(service string) {
	c.t.Helper()
	timeout := 5
	if err := c.cli.ContainerRestart(context.Background(), c.container(service), container.StopOptions{Timeout: &timeout}); err != nil {
		c.t.Fatalf("restart %s: %v", service, err)
	}
}

// disconnect cuts a node (its app's container, whose network namespace the
// node's agent and sidecar share) off the cluster network, as `docker
// network disconnect` does; reconnect puts it back at its address.
func (c *cluster) disconnect(node string) {
	c.t.Helper()
	if err := c.cli.NetworkDisconnect(context.Background(), c.netID, c.container(node), true); err != nil {
		c.t.Fatalf("disconnect %s: %v", node, err)
	}
}

func (c *cluster) reconnect(node string) {
	c.t.Helper()
	err := c.cli.NetworkConnect(context.Background(), c.netID, c.container(node),
		&network.EndpointSettings{IPAMConfig: &network.EndpointIPAMConfig{IPv4Address: c.ip(node)}})
	if err != nil {
		c.t.Fatalf("reconnect %s: %v", node, err)
	}
}

// startedAt is when a service's container last started (a sidecar that
// was never restarted keeps its first).
func (c *cluster) startedAt(service string) string {
	c.t.Helper()
	info, err := c.cli.ContainerInspect(context.Background(), c.container(service))
	if err != nil {
		c.t.Fatal(err)
	}
	return info.State.StartedAt
}

// What the mesh does.

// call sends one request with method to web's upstream api (web's sidecar
// on node-1, playing web's app) and says which api instance answered.
func (c *cluster) call(client *http.Client, method string) answer {
	return doAnswer(client, method, "http://"+c.addr("web", 9191)+"/")
}

// inbound sends one request, on a new mTLS connection holding leaf,
// straight to an api node's sidecar (its inbound listener, authorized by
// its SPOA).
func (c *cluster) inbound(node string, leaf *harness.Leaf) answer {
	tr := &http.Transport{DisableKeepAlives: true, TLSClientConfig: c.clientTLS(leaf)}
	defer tr.CloseIdleConnections()
	return doAnswer(&http.Client{Timeout: 5 * time.Second, Transport: tr}, "GET", "https://"+c.addr(node, 21000)+"/")
}

// clientTLS presents leaf and checks the server's chain against Consul's
// current roots (c.roots follows a rotation); nil roots: not checked.
func (c *cluster) clientTLS(leaf *harness.Leaf) *tls.Config {
	cfg := &tls.Config{Certificates: []tls.Certificate{leaf.TLS}, InsecureSkipVerify: true}
	if c.roots != nil {
		cfg.VerifyPeerCertificate = c.roots.verify
	}
	return cfg
}

// rootsPool verifies a sidecar's certificate chain against Consul's CA
// roots, fetched again when a chain does not verify (after a rotation).
type rootsPool struct {
	c    *cluster
	mu   sync.Mutex
	pool *x509.CertPool
}

func (r *rootsPool) verify(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return errors.New("no server certificate")
	}
	certs := make([]*x509.Certificate, len(raw))
	for i, b := range raw {
		cert, err := x509.ParseCertificate(b)
		if err != nil {
			return err
		}
		certs[i] = cert
	}
	inter := x509.NewCertPool()
	for _, cert := range certs[1:] {
		inter.AddCert(cert)
	}
	check := func(pool *x509.CertPool) error {
		_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pool != nil && check(r.pool) == nil {
		return nil
	}
	roots, _, err := r.c.agent("web").Agent().ConnectCARoots(nil)
	if err != nil {
		return fmt.Errorf("CA roots: %w", err)
	}
	pool := x509.NewCertPool()
	for _, root := range roots.Roots {
		pool.AppendCertsFromPEM([]byte(root.RootCertPEM))
	}
	r.pool = pool
	return check(pool)
}

// servedLeaf is the certificate a node's sidecar serves on its inbound
// listener now.
func (c *cluster) servedLeaf(node string) (*x509.Certificate, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", c.addr(node, 21000),
		&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{c.probe.TLS}})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0], nil
}

// requiresClientCert reports whether a node's inbound listener refuses a
// caller without a client certificate (in TLS 1.3 the client sees the
// refusal on its first read).
func (c *cluster) requiresClientCert(node string) bool {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", c.addr(node, 21000), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		return true
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	_, err = conn.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// upInPool counts the api instances UP in web's HAProxy (its stats page,
// which does not show their addresses; -1 when it does not answer).
func (c *cluster) upInPool() int {
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + c.addr("web", 19100) + "/stats;csv")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		if len(f) > 17 && f[0] == "upstream_api" && f[1] != "BACKEND" && f[1] != "FRONTEND" && f[17] == "UP" {
			n++
		}
	}
	return n
}

// passing reports whether Consul (as web's agent answers) lists api's
// instance on node as a passing instance of the mesh service.
func (c *cluster) passing(node string) bool {
	entries, _, err := c.agent("web").Health().Connect("api", "", true, nil)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if e.Node.Address == c.ip(node) {
			return true
		}
	}
	return false
}

// doAnswer sends one request and reads who answered: the demo app says
// "hello from <name> ...".
func doAnswer(client *http.Client, method, url string) answer {
	sent := time.Now()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return answer{at: time.Now(), sent: sent, err: err}
	}
	a := answerOf(client, req, sent)
	if f := strings.Fields(a.body); a.code == 200 && len(f) >= 3 && f[0] == "hello" {
		a.id = f[2]
	}
	return a
}

// failureKind names what went wrong with a request: a status (with the
// denial reason the sidecar gives), a timeout, a reset, ...
func failureKind(a answer) string {
	switch {
	case a.err != nil:
		var ne net.Error
		msg := a.err.Error()
		switch {
		case errors.As(a.err, &ne) && ne.Timeout():
			return "timeout"
		case strings.Contains(msg, "connection reset"):
			return "reset"
		case strings.Contains(msg, "connection refused"):
			return "refused"
		case strings.Contains(msg, "EOF"):
			return "closed"
		}
		return "error"
	case a.code != 200:
		for _, reason := range []string{"consul_stale", "consul_unavailable", "intention_deny"} {
			if strings.Contains(a.body, reason) {
				return fmt.Sprintf("%d %s", a.code, reason)
			}
		}
		return fmt.Sprint(a.code)
	}
	return ""
}

// The load.

// loadStream is one kind of traffic: requests through web's upstream (method,
// keep-alive or a new connection each), or straight to an api node's
// inbound as probe, on a new mTLS connection each.
type loadStream struct {
	name    string
	method  string
	newConn bool
	inbound string // an api node: probe -> its sidecar directly
	workers int
}

// Every request is bounded by its client's timeout: longer than HAProxy's
// timeout server (1m), so that a request HAProxy retries after it is
// counted by what HAProxy answered, not by the client giving up.
const clusterRequestTimeout = 80 * time.Second

// streams are the usual load: keep-alive and new-connection GETs and
// keep-alive POSTs through web, and probe on new connections to each
// inbound given.
func streams(inbound ...string) []loadStream {
	s := []loadStream{
		{name: "GET keep-alive", method: "GET", workers: 3},
		{name: "GET new-conn", method: "GET", newConn: true, workers: 2},
		{name: "POST keep-alive", method: "POST", workers: 2},
	}
	for _, n := range inbound {
		s = append(s, loadStream{name: "probe new-mTLS -> " + n, method: "GET", inbound: n, workers: 1})
	}
	return s
}

// clusterLoad runs streams until finish, for at most limit; each worker
// paces itself (about 50 requests a second) so that two cores are enough.
type clusterLoad struct {
	c       *cluster
	streams []loadStream
	tallies []*tally
	stop    chan struct{}
	wg      sync.WaitGroup
	started time.Time
}

func (c *cluster) startLoad(limit time.Duration, ss []loadStream) *clusterLoad {
	l := &clusterLoad{c: c, streams: ss, stop: make(chan struct{}), started: time.Now()}
	deadline := l.started.Add(limit)
	for _, s := range ss {
		tl := &tally{}
		l.tallies = append(l.tallies, tl)
		for range s.workers {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				client := &http.Client{Timeout: clusterRequestTimeout}
				if s.newConn {
					client.Transport = &http.Transport{DisableKeepAlives: true}
				}
				for time.Now().Before(deadline) {
					select {
					case <-l.stop:
						return
					case <-time.After(20 * time.Millisecond):
					}
					if s.inbound != "" {
						tl.add(c.inbound(s.inbound, c.probe))
					} else {
						tl.add(c.call(client, s.method))
					}
				}
			}()
		}
	}
	return l
}

// finish stops the load and waits for the requests in flight.
func (l *clusterLoad) finish() { close(l.stop); l.wg.Wait() }

// figures logs, per stream, the requests sent, failed by kind, the
// instances that answered and the slowest answer; and returns the failures
// of every stream by kind.
func (l *clusterLoad) figures(t *testing.T, scenario string) map[string]map[string]int {
	t.Helper()
	all := map[string]map[string]int{}
	for i, s := range l.streams {
		tl := l.tallies[i]
		tl.mu.Lock()
		kinds := map[string]int{}
		var slowest time.Duration
		stalled := 0
		for _, a := range tl.answers {
			if k := failureKind(a); k != "" {
				kinds[k]++
			}
			slowest = max(slowest, a.at.Sub(a.sent))
			if a.at.Sub(a.sent) > time.Second {
				stalled++
			}
		}
		t.Logf("FIGURES %s | %s | sent %d | failed %d %s | by instance %v | %d took over 1s, slowest %v", scenario, s.name,
			len(tl.answers), tl.failed, kindString(kinds), tl.byID, stalled, slowest.Round(time.Millisecond))
		all[s.name] = kinds
		tl.mu.Unlock()
	}
	return all
}

func kindString(kinds map[string]int) string {
	if len(kinds) == 0 {
		return ""
	}
	var parts []string
	for k, n := range kinds {
		parts = append(parts, fmt.Sprintf("%s: %d", k, n))
	}
	sort.Strings(parts)
	return "(" + strings.Join(parts, ", ") + ")"
}

// answers returns every answer of the streams whose name starts with
// prefix ("" for all).
func (l *clusterLoad) answers(prefix string) []answer {
	var out []answer
	for i, s := range l.streams {
		if !strings.HasPrefix(s.name, prefix) {
			continue
		}
		tl := l.tallies[i]
		tl.mu.Lock()
		out = append(out, tl.answers...)
		tl.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].at.Before(out[j].at) })
	return out
}

// noFailures fails t for every stream with a failed request.
func (l *clusterLoad) noFailures(t *testing.T, what string) {
	t.Helper()
	for i, s := range l.streams {
		l.tallies[i].noFailures(t, what+": "+s.name)
		l.tallies[i].mu.Lock()
		n := len(l.tallies[i].answers)
		l.tallies[i].mu.Unlock()
		if n == 0 {
			t.Errorf("%s: %s sent no request", what, s.name)
		}
	}
}

// waitUntil polls cond every 100ms for at most timeout and returns when it
// became true (zero if it never did).
func waitUntil(timeout time.Duration, cond func() bool) time.Time {
	end := time.Now().Add(timeout)
	for time.Now().Before(end) {
		if cond() {
			return time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Time{}
}

// since is how long after from at was, for the figures ("never" for zero).
func since(from, at time.Time) string {
	if at.IsZero() {
		return "never"
	}
	return at.Sub(from).Round(10 * time.Millisecond).String()
}

// tally returns the tally of the loadStream named name.
func (l *clusterLoad) tally(name string) *tally {
	for i, s := range l.streams {
		if s.name == name {
			return l.tallies[i]
		}
	}
	panic("no loadStream " + name)
}
