// The discovery chain fixture: a service api in two versions (subsets by
// Service.Meta.version), other services a chain can send api's traffic to
// (api-backup, api-v3), a caller web with an upstream api, the config
// entries that make the chain (service-resolver, -splitter, -router)
// written through Consul's API, and loads that count who answered.

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// chainServices are the HTTP services of the chain tests; each gets
// service-defaults protocol http (splitters and routers need it, and a
// resolver's redirect or failover needs the same protocol on both sides)
// and an intention allowing web.
var chainServices = []string{"api", "api-v3", "api-backup"}

// newChainMesh starts Consul with chainServices set up as above.
func newChainMesh(t *testing.T) *mesh {
	t.Helper()
	m := newMesh(t)
	for _, s := range chainServices {
		m.consul.SetProtocol(t, s, "http")
		m.consul.SetIntentions(t, s, harness.Source("web", allow), harness.Source("*", deny))
	}
	return m
}

// addVersion registers instance id of service with Meta version=version
// and an app that answers "<id> <request URI> x-user=<X-User>
// source=<X-Haconnect-Source>" (after ?sleep=<duration>), and starts its
// sidecar.
func (m *mesh) addVersion(service, id, version string) *instance {
	m.t.Helper()
	in := &instance{id: id}
	if version != "" {
		in.meta = map[string]string{"version": version}
	}
	in.app = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// ?sleep=<duration> (at most 3s) makes a slow answer.
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil && d <= 3*time.Second {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
			}
		}
		fmt.Fprintf(w, "%s %s x-user=%s source=%s", id, r.URL.RequestURI(), r.Header.Get("X-User"), r.Header.Get("X-Haconnect-Source"))
	}))
	m.t.Cleanup(in.app.Close)
	return m.register(in, service, "http", in.app.Listener.Addr().(*net.TCPAddr).Port)
}

// addTCPVersion registers a TCP instance whose app answers each line
// with "<id> <line>".
func (m *mesh) addTCPVersion(service, id string) *instance {
	m.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := fmt.Fprintf(c, "%s %s\n", id, sc.Text()); err != nil {
						return
					}
				}
			}()
		}
	}()
	return m.register(&instance{id: id}, service, "tcp", l.Addr().(*net.TCPAddr).Port)
}

// tcpWho sends line on a new connection through in's upstream dest and
// returns the id of the app that answered.
func (in *instance) tcpWho(dest, line string) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", in.upstream[dest]), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	id, rest, _ := strings.Cut(strings.TrimSpace(got), " ")
	if rest != line {
		return "", fmt.Errorf("%s answered %q to %q", id, rest, line)
	}
	return id, nil
}

// versionSubsets are api's subsets by Service.Meta.version.
func versionSubsets() map[string]api.ServiceResolverSubset {
	return map[string]api.ServiceResolverSubset{
		"v1": {Filter: `Service.Meta.version == v1`},
		"v2": {Filter: `Service.Meta.version == v2`},
	}
}

// resolver is a service-resolver of service with versionSubsets and
// DefaultSubset def ("" for none), changed by the options.
func resolver(service, def string, opts ...func(*api.ServiceResolverConfigEntry)) *api.ServiceResolverConfigEntry {
	e := &api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: service, DefaultSubset: def, Subsets: versionSubsets()}
	for _, o := range opts {
		o(e)
	}
	return e
}

// splitter splits service's requests between its subsets: weights maps a
// subset to its percentage.
func splitter(service string, weights map[string]float32) *api.ServiceSplitterConfigEntry {
	e := &api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: service}
	var names []string
	for s := range weights {
		names = append(names, s)
	}
	sort.Strings(names)
	for _, s := range names {
		e.Splits = append(e.Splits, api.ServiceSplit{Weight: weights[s], ServiceSubset: s})
	}
	return e
}

// router is a service-router of service with routes.
func router(service string, routes ...api.ServiceRoute) *api.ServiceRouterConfigEntry {
	return &api.ServiceRouterConfigEntry{Kind: api.ServiceRouter, Name: service, Routes: routes}
}

// setEntry writes a config entry through Consul's API.
func setEntry(t testing.TB, m *mesh, e api.ConfigEntry) {
	t.Helper()
	if ok, _, err := m.consul.Client.ConfigEntries().Set(e, nil); err != nil || !ok {
		t.Fatalf("write %s %s: ok=%v err=%v", e.GetKind(), e.GetName(), ok, err)
	}
}

// setChain makes service's chain the given entries: it removes a router
// and a splitter not given (router first: Consul checks the chain on
// every write and delete), then writes the resolver, the splitter and the
// router given, in that order.
func setChain(t testing.TB, m *mesh, service string, res *api.ServiceResolverConfigEntry, split *api.ServiceSplitterConfigEntry, rt *api.ServiceRouterConfigEntry) {
	t.Helper()
	del := func(kind string) {
		if _, err := m.consul.Client.ConfigEntries().Delete(kind, service, nil); err != nil {
			t.Fatalf("delete %s %s: %v", kind, service, err)
		}
	}
	if rt == nil {
		del(api.ServiceRouter)
	}
	if split == nil {
		del(api.ServiceSplitter)
	}
	if res == nil {
		del(api.ServiceResolver)
	} else {
		setEntry(t, m, res)
	}
	if split != nil {
		setEntry(t, m, split)
	}
	if rt != nil {
		setEntry(t, m, rt)
	}
}

// answer is who answered a request through the mesh, and what the app saw.
type answer struct {
	at   time.Time // when it ended
	sent time.Time // when it was sent
	code int
	id   string // the app's instance
	uri  string // the request URI the app saw
	body string
	err  error
}

// ok reports whether the app answered 200.
func (a answer) ok() bool { return a.err == nil && a.code == 200 }

// chainRequest is one request of a load: path and extra headers.
type chainRequest struct {
	path    string
	headers map[string]string
}

// do sends r through in's upstream dest with client.
func (in *instance) do(client *http.Client, dest string, r chainRequest) answer {
	if r.path == "" {
		r.path = "/"
	}
	sent := time.Now()
	req, err := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d%s", in.upstream[dest], r.path), nil)
	if err != nil {
		return answer{at: time.Now(), sent: sent, err: err}
	}
	for k, v := range r.headers {
		req.Header.Set(k, v)
	}
	a := answerOf(client, req, sent)
	if f := strings.Fields(a.body); a.code == 200 && len(f) >= 2 {
		a.id, a.uri = f[0], f[1]
	}
	return a
}

// reuseClient is a client that reuses its connections (a split or a route
// applies to each request, not each connection); freshClient one that
// does not.
func reuseClient() *http.Client { return &http.Client{Timeout: 5 * time.Second} }
func freshClient() *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
}

// tally counts a load's answers.
type tally struct {
	mu      sync.Mutex
	answers []answer // in the order they came
	byID    map[string]int
	failed  int
	errs    []string
}

func (c *tally) add(a answer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byID == nil {
		c.byID = map[string]int{}
	}
	c.answers = append(c.answers, a)
	if !a.ok() {
		c.failed++
		if len(c.errs) < 5 {
			c.errs = append(c.errs, fmt.Sprintf("%d %q %v", a.code, a.body, a.err))
		}
		return
	}
	c.byID[a.id]++
}

// share is the fraction of successful answers from instances whose id
// starts with prefix.
func (c *tally) share(prefix string) float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, total := 0, 0
	for id, k := range c.byID {
		total += k
		if strings.HasPrefix(id, prefix) {
			n += k
		}
	}
	if total == 0 {
		return 0
	}
	return float64(n) / float64(total)
}

func (c *tally) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("%d answers, %d failed, by instance %v", len(c.answers), c.failed, c.byID)
}

// noFailures fails t if any request of the tally failed.
func (c *tally) noFailures(t testing.TB, what string) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failed > 0 {
		t.Errorf("%s: %d of %d requests failed, e.g. %v", what, c.failed, len(c.answers), c.errs)
	}
}

// count sends n requests (made by mk from their index) through in's
// upstream dest with workers keep-alive clients, and counts who answered.
func count(in *instance, dest string, n, workers int, mk func(i int) chainRequest) *tally {
	c := &tally{}
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := reuseClient()
			for i := range next {
				c.add(in.do(client, dest, mk(i)))
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return c
}

// chainLoad is count until stopped: workers keep-alive clients send
// requests through in's upstream dest until finish is called, for at
// most limit (a bound on any test's traffic).
type chainLoad struct {
	*tally
	stop chan struct{}
	wg   sync.WaitGroup
}

func startChainLoad(in *instance, dest string, workers int, limit time.Duration, mk func(i int) chainRequest) *chainLoad {
	l := &chainLoad{tally: &tally{}, stop: make(chan struct{})}
	deadline := time.Now().Add(limit)
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func(w int) {
			defer l.wg.Done()
			client := reuseClient()
			for i := w; time.Now().Before(deadline); i += workers {
				select {
				case <-l.stop:
					return
				default:
				}
				l.add(in.do(client, dest, mk(i)))
			}
		}(w)
	}
	return l
}

func (l *chainLoad) finish() { close(l.stop); l.wg.Wait() }

// since returns the answers that came after t.
func (c *tally) since(t time.Time) []answer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []answer
	for _, a := range c.answers {
		if a.at.After(t) {
			out = append(out, a)
		}
	}
	return out
}

// shareOf is the fraction of answers whose id starts with prefix.
func shareOf(as []answer, prefix string) float64 {
	if len(as) == 0 {
		return 0
	}
	n := 0
	for _, a := range as {
		if strings.HasPrefix(a.id, prefix) {
			n++
		}
	}
	return float64(n) / float64(len(as))
}

// waitAnswers waits until every one of k consecutive requests r through
// in's upstream dest is answered 200 by an instance accepted by want.
func waitAnswers(t testing.TB, in *instance, dest string, timeout time.Duration, what string, k int, r chainRequest, want func(a answer) bool) {
	t.Helper()
	client := reuseClient()
	var last answer
	harness.WaitFor(t, timeout, what, func() bool {
		for i := 0; i < k; i++ {
			last = in.do(client, dest, r)
			if !last.ok() || !want(last) {
				return false
			}
		}
		return true
	})
}

// from accepts answers from instances whose id starts with prefix.
func from(prefix string) func(a answer) bool {
	return func(a answer) bool { return strings.HasPrefix(a.id, prefix) }
}

// maintenance puts a sidecar's registration (the service in's proxy) in
// or out of maintenance: a critical check, so the proxy is no longer a
// passing instance of the service.
func (m *mesh) maintenance(t testing.TB, in *instance, on bool) {
	t.Helper()
	id := in.id + "-sidecar-proxy"
	var err error
	if on {
		err = m.consul.Client.Agent().EnableServiceMaintenance(id, "chain test: the instance goes down")
	} else {
		err = m.consul.Client.Agent().DisableServiceMaintenance(id)
	}
	if err != nil {
		t.Fatalf("maintenance %v on %s: %v", on, id, err)
	}
}

// logLine returns the first line of a process's output holding every one
// of words ("" when none does).
func logLine(out string, words ...string) string {
	for _, line := range strings.Split(out, "\n") {
		all := true
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			return line
		}
	}
	return ""
}

// answerOf sends req (sent then) and records its answer, the body read
// whole.
func answerOf(client *http.Client, req *http.Request, sent time.Time) answer {
	resp, err := client.Do(req)
	if err != nil {
		return answer{at: time.Now(), sent: sent, err: err}
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return answer{at: time.Now(), sent: sent, code: resp.StatusCode, body: string(b), err: err}
}
