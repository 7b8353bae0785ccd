package dnsresolve

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/internal/testkit/dnstest"
)

// logBuf collects log lines from several goroutines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// start runs a Resolver against a real DNS server the test controls, with
// a short interval.
func start(t *testing.T, cfg Config) (*Resolver, *dnstest.Server, *logBuf, *atomic.Int32) {
	t.Helper()
	srv, err := dnstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	lk, err := NetResolver(srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	changes := &atomic.Int32{}
	cfg.Lookuper = lk
	if cfg.Interval == 0 {
		cfg.Interval = 50 * time.Millisecond
	}
	cfg.Logger = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	cfg.OnChange = func() { changes.Add(1) }
	r := New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r, srv, logs, changes
}

// waitAddrs waits until name's answer is want (nil: answered with none).
func waitAddrs(t *testing.T, r *Resolver, name string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		got, ok := r.Addrs(name)
		if ok && fmt.Sprint(got) == fmt.Sprint(want) && (len(want) > 0 || got == nil) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: addresses %v (answered %v), want %v", name, got, ok, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestResolverFollowsChanges(t *testing.T) {
	r, srv, _, changes := start(t, Config{})
	srv.Set("api.mesh.test", "10.0.0.1")
	if _, ok := r.Addrs("api.mesh.test"); ok {
		t.Fatal("a name not wanted has an answer")
	}
	r.Want([]string{"api.mesh.test"})
	waitAddrs(t, r, "api.mesh.test", "10.0.0.1")
	if changes.Load() < 1 {
		t.Fatal("the first answer was not reported")
	}
	before := changes.Load()
	srv.Set("api.mesh.test", "10.0.0.3", "10.0.0.2")
	waitAddrs(t, r, "api.mesh.test", "10.0.0.2", "10.0.0.3") // sorted
	if changes.Load() == before {
		t.Fatal("the change was not reported")
	}
	// The same answer again and again is not a change.
	settled := changes.Load()
	time.Sleep(200 * time.Millisecond)
	if changes.Load() != settled {
		t.Fatalf("unchanged answers reported as changes: %d -> %d", settled, changes.Load())
	}
}

func TestResolverNotFoundThenFound(t *testing.T) {
	r, srv, logs, _ := start(t, Config{})
	srv.Set("db.mesh.test", "10.0.0.7")
	r.Want([]string{"db.mesh.test"})
	waitAddrs(t, r, "db.mesh.test", "10.0.0.7")
	// DNS says the name is gone: it has no address any more (its
	// instances get no server), logged once however many lookups fail.
	srv.Delete("db.mesh.test")
	waitAddrs(t, r, "db.mesh.test")
	n := srv.Queries("db.mesh.test")
	for srv.Queries("db.mesh.test") < n+6 {
		time.Sleep(10 * time.Millisecond)
	}
	if c := logs.count("host name does not resolve"); c != 1 {
		t.Fatalf("%d log lines for a name that does not resolve, want 1:\n%s", c, logs.b.String())
	}
	srv.Set("db.mesh.test", "10.0.0.8")
	waitAddrs(t, r, "db.mesh.test", "10.0.0.8")
	if logs.count("host name resolves again") != 1 {
		t.Fatalf("recovery not logged once:\n%s", logs.b.String())
	}
}

func TestResolverKeepsLastAddressesWhenDNSFails(t *testing.T) {
	r, srv, logs, _ := start(t, Config{Timeout: 100 * time.Millisecond})
	srv.Set("web.mesh.test", "10.0.1.1")
	r.Want([]string{"web.mesh.test"})
	waitAddrs(t, r, "web.mesh.test", "10.0.1.1")
	for _, fail := range []func(string){srv.ServFail, srv.Silent} {
		fail("web.mesh.test")
		n := srv.Queries("web.mesh.test")
		for srv.Queries("web.mesh.test") < n+4 {
			time.Sleep(10 * time.Millisecond)
		}
		if got, _ := r.Addrs("web.mesh.test"); fmt.Sprint(got) != "[10.0.1.1]" {
			t.Fatalf("a failing lookup dropped the last addresses: %v", got)
		}
		srv.Set("web.mesh.test", "10.0.1.1")
		time.Sleep(150 * time.Millisecond)
	}
	if c := logs.count("host name lookup failing"); c != 2 {
		t.Fatalf("%d failing lines, want one per failing run (2):\n%s", c, logs.b.String())
	}
}

// A name whose nameserver never answers delays neither Want nor the
// other names: each lookup is bounded and they run side by side.
func TestResolverNeverWaits(t *testing.T) {
	r, srv, _, _ := start(t, Config{Timeout: time.Second, Interval: time.Hour})
	srv.Silent("slow.mesh.test")
	srv.Set("fast.mesh.test", "10.0.2.1")
	began := time.Now()
	r.Want([]string{"slow.mesh.test", "fast.mesh.test"})
	if _, ok := r.Addrs("slow.mesh.test"); ok || time.Since(began) > 50*time.Millisecond {
		t.Fatalf("Want waited %s or answered before DNS did", time.Since(began))
	}
	waitAddrs(t, r, "fast.mesh.test", "10.0.2.1")
	if took := time.Since(began); took > 500*time.Millisecond {
		t.Fatalf("a name behind a silent one took %s", took)
	}
	// A name added later is looked up at once, not after the interval.
	srv.Set("late.mesh.test", "10.0.2.2")
	r.Want([]string{"fast.mesh.test", "late.mesh.test"})
	waitAddrs(t, r, "late.mesh.test", "10.0.2.2")
	// A name no longer wanted is forgotten.
	if _, ok := r.Addrs("slow.mesh.test"); ok {
		t.Fatal("forgotten name still answered")
	}
}

func TestResolverBoundsAddresses(t *testing.T) {
	r, srv, logs, _ := start(t, Config{MaxAddrs: 3})
	var many []string
	for i := 20; i > 0; i-- {
		many = append(many, fmt.Sprintf("10.0.3.%d", i))
	}
	srv.Set("many.mesh.test", append(many, "fd00::1")...)
	srv.Set("six.mesh.test", "fd00::2", "fd00::1")
	r.Want([]string{"many.mesh.test", "six.mesh.test"})
	// IPv4 preferred, sorted, the first three kept.
	waitAddrs(t, r, "many.mesh.test", "10.0.3.1", "10.0.3.2", "10.0.3.3")
	waitAddrs(t, r, "six.mesh.test", "fd00::1", "fd00::2")
	time.Sleep(150 * time.Millisecond)
	if c := logs.count("more addresses than are used"); c != 1 {
		t.Fatalf("%d lines for a capped answer, want 1:\n%s", c, logs.b.String())
	}
}

func TestIsName(t *testing.T) {
	for host, want := range map[string]bool{"10.0.0.1": false, "::1": false, "api.service.consul": true, "app": true, "": false} {
		if IsName(host) != want {
			t.Errorf("IsName(%q) = %v", host, !want)
		}
	}
}
