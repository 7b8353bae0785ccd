package revoke

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/spoa/authz"
)

// tablesRuntime answers "show table <name>" from tables and "show sess"
// from sess, and records the sessions shut down.
type tablesRuntime struct {
	tables map[string]string
	sess   string
	shut   []string
}

func (f *tablesRuntime) Command(c string) (string, error) {
	switch {
	case strings.HasPrefix(c, "show table "):
		if t, ok := f.tables[strings.TrimPrefix(c, "show table ")]; ok {
			return t, nil
		}
		return "No such table\n", nil
	case c == "show sess":
		return f.sess, nil
	case strings.HasPrefix(c, "shutdown session "):
		f.shut = append(f.shut, strings.TrimPrefix(c, "shutdown session "))
		return "", nil
	}
	return "Unknown command\n", nil
}

// The standalone example tracks its HTTP listener's upgraded streams and its
// TCP listener's connections in one table; sessions of both are closed, and
// only theirs. Keys and sources are IPv6 as HAProxy prints them.
func TestSweepClosesUpgradedAndTCPStreamsOfEveryFrontend(t *testing.T) {
	long := "spiffe://11111111-2222-3333-4444-555555555555.consul/ap/" + strings.Repeat("p", 63) +
		"/ns/" + strings.Repeat("n", 63) + "/dc/" + strings.Repeat("d", 63) + "/svc/" + strings.Repeat("s", 256)
	rt := &tablesRuntime{
		tables: map[string]string{"haconnect_conns": "# table: haconnect_conns, type: string, size:102400, used:3\n" +
			"0x1a: key=ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff:4001|" + long + " use=1 exp=30000\n" +
			"0x1b: key=::1:4002|" + long + " use=1 exp=30000\n" +
			"0x1c: key=::1:4003|" + batch + " use=1 exp=30000\n\n"},
		sess: "0x100: proto=tcpv6 src=ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff:4001 fe=inbound be=app srv=app ts=00 age=2s\n" +
			"0x101: proto=tcpv6 src=::1:4002 fe=inbound_tcp be=tcp_app srv=tcp_app ts=00 age=2s\n" +
			"0x102: proto=tcpv6 src=::1:4003 fe=inbound be=app srv=app ts=00 age=2s\n" +
			"0x103: proto=tcpv6 src=::1:4002 fe=other be=x srv=x ts=00 age=2s\n",
	}
	r, err := New(Config{Runtime: rt, Destination: "api", Table: "haconnect_conns", Frontends: []string{"inbound", "inbound_tcp"}})
	if err != nil {
		t.Fatal(err)
	}
	n, err := r.Sweep(fakeChecker{long: authz.Deny(authz.ReasonIntentionDeny), batch: {Allow: true, Reason: authz.ReasonIntentionAllow}})
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 || strings.Join(rt.shut, ",") != "0x100,0x101" {
		t.Fatalf("closed %d %v, want the long identity's sessions on inbound and inbound_tcp (0x100,0x101)", n, rt.shut)
	}
}

func TestNewRefusesAnEmptyFrontend(t *testing.T) {
	for _, fes := range [][]string{nil, {""}, {"inbound", ""}} {
		if _, err := New(Config{Runtime: &tablesRuntime{}, Destination: "api", Table: "haconnect_conns", Frontends: fes}); err == nil {
			t.Errorf("frontends %q accepted", fes)
		}
	}
}

func TestUntrackedCountedOverWorkers(t *testing.T) {
	worker := func(full int) *fakeRuntime {
		return &fakeRuntime{table: "# table: haconnect_untracked, type: string, size:4, used:2\n" +
			"0x1a: key=table_full use=0 exp=0 gpc0=" + strings.Repeat("1", full) + "\n" +
			"0x1b: key=key_too_long use=0 exp=0 gpc0=2\n\n"}
	}
	var logs strings.Builder
	reg := prometheus.NewPedanticRegistry()
	r, err := New(Config{Runtime: masterRuntime{map[string]*fakeRuntime{"9554": worker(1), "9509": worker(2)}},
		Destination: "api", Table: "haconnect_conns", Frontends: []string{"public_listener"}, Untracked: "haconnect_untracked",
		Registerer: reg, Logger: hclog.New(&hclog.LoggerOptions{Output: &logs})})
	if err != nil {
		t.Fatal(err)
	}
	_ = r
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "haconnect_untracked_connections_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	if got["table_full"] != 1+11 || got["key_too_long"] != 4 {
		t.Fatalf("haconnect_untracked_connections_total = %v, want table_full 12 and key_too_long 4 (two workers)", got)
	}
	if !strings.Contains(logs.String(), "could not be tracked for revocation") {
		t.Errorf("refused streams are not logged:\n%s", logs.String())
	}
}

// lockedLog is a log output read while Run writes it.
type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Refusals are logged by Run's own check, without a scrape.
func TestRunLogsUntrackedWithoutAScrape(t *testing.T) {
	logs := &lockedLog{}
	rt := &fakeRuntime{table: "0x1a: key=table_full use=0 exp=0 gpc0=5\n"}
	r, err := New(Config{Runtime: rt, Destination: "api", Table: "haconnect_conns", Frontends: []string{"public_listener"},
		Untracked: "haconnect_untracked", UntrackedEvery: 10 * time.Millisecond,
		Logger: hclog.New(&hclog.LoggerOptions{Output: logs})})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx, fakeChecker{}); close(done) }()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if out := logs.String(); strings.Contains(out, "could not be tracked for revocation") {
			if strings.Count(out, "could not be tracked") != 1 || !strings.Contains(out, "refused=5") {
				t.Fatalf("want one line for 5 refusals, logged:\n%s", out)
			}
			return
		}
	}
	t.Fatalf("no refusal logged in 5s:\n%s", logs.String())
}
