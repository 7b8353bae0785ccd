package harness

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/consul/api"
)

// ConsulFilter is an HTTP proxy in front of a plain-HTTP agent that can
// make chosen endpoints fail while the rest keeps answering: the agent's
// cached CA roots with the servers gone, or a token refused on one
// destination only.
type ConsulFilter struct {
	Addr   string
	consul *Consul

	mu    sync.Mutex
	rules []filterRule
}

type filterRule struct {
	match  func(*http.Request) bool
	status int
	body   string
}

// NewConsulFilter starts the proxy on a free loopback port.
func NewConsulFilter(t testing.TB, c *Consul) *ConsulFilter {
	t.Helper()
	target, _ := url.Parse("http://" + c.Addr)
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	proxy.ErrorLog = log.New(io.Discard, "", 0) // a cancelled blocking query is no news
	f := &ConsulFilter{consul: c}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.Addr = l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rule, ok := f.rule(r); ok {
			http.Error(w, rule.body, rule.status)
			return
		}
		proxy.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return f
}

// Fail makes every request whose path starts with pathPrefix (and whose
// query contains query, if not empty) answer status with body.
func (f *ConsulFilter) Fail(pathPrefix, query string, status int, body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = append(f.rules, filterRule{
		match: func(r *http.Request) bool {
			return strings.HasPrefix(r.URL.Path, pathPrefix) && strings.Contains(r.URL.RawQuery, query)
		},
		status: status, body: body,
	})
}

// Clear lets every request through again.
func (f *ConsulFilter) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rules = nil
}

func (f *ConsulFilter) rule(r *http.Request) (filterRule, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, rule := range f.rules {
		if rule.match(r) {
			return rule, true
		}
	}
	return filterRule{}, false
}

// Config is a client configuration that goes through the filter.
func (f *ConsulFilter) Config() *api.Config {
	cfg := f.consul.Config()
	cfg.Address = f.Addr
	cfg.Scheme = "http"
	return cfg
}
