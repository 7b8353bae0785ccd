package revoke

import (
	"net"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/spoa/authz"
)

// fakeRuntime answers show table / show sess with canned HAProxy 2.6 output
// and records the sessions shut down. (The e2e tests run the real thing.)
type fakeRuntime struct {
	table, sess string
	shut        []string
}

func (f *fakeRuntime) Command(c string) (string, error) {
	switch {
	case strings.HasPrefix(c, "show table "):
		return f.table, nil
	case c == "show sess":
		return f.sess, nil
	case strings.HasPrefix(c, "shutdown session "):
		f.shut = append(f.shut, strings.TrimPrefix(c, "shutdown session "))
		return "", nil
	}
	return "Unknown command\n", nil
}

type fakeChecker map[string]*authz.Decision

func (f fakeChecker) Recheck(_, spiffe string) *authz.Decision { return f[spiffe] }

const (
	web   = "spiffe://td.consul/ns/default/dc/dc1/svc/web"
	batch = "spiffe://td.consul/ns/default/dc/dc1/svc/batch"
	other = "spiffe://td.consul/ns/default/dc/dc1/svc/other"
)

func TestSweepClosesOnlyDeniedCallersOnTheListener(t *testing.T) {
	rt := &fakeRuntime{
		table: "# table: haconnect_conns, type: string, size:102400, used:4\n" +
			"0x1a: key=127.0.0.1:4001|" + web + " use=1 exp=30000\n" +
			"0x1b: key=127.0.0.1:4002|" + web + " use=0 exp=12000\n" + // closed already
			"0x1c: key=127.0.0.1:4003|" + batch + " use=1 exp=30000\n" +
			"0x1d: key=127.0.0.1:4004|" + other + " use=1 exp=30000\n\n",
		sess: "0x100: proto=tcpv4 src=127.0.0.1:4001 fe=public_listener be=local_app srv=app ts=00 age=2s\n" +
			"0x101: proto=tcpv4 src=127.0.0.1:4003 fe=public_listener be=local_app srv=app ts=00 age=2s\n" +
			"0x102: proto=tcpv4 src=127.0.0.1:4004 fe=public_listener be=local_app srv=app ts=00 age=2s\n" +
			"0x103: proto=tcpv4 src=127.0.0.1:4001 fe=upstream_listener_db be=upstream_db srv=s1 ts=00 age=2s\n" +
			"0x104: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 age=0s\n",
	}
	r, err := New(Config{Runtime: rt, Destination: "echo", Table: "haconnect_conns", Frontends: []string{"public_listener"}})
	if err != nil {
		t.Fatal(err)
	}
	n, err := r.Sweep(fakeChecker{
		web:   authz.Deny(authz.ReasonIntentionDeny),
		batch: {Allow: true, Reason: authz.ReasonIntentionAllow},
		// other: nil, the authorizer cannot tell: left open
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 || len(rt.shut) != 1 || rt.shut[0] != "0x100" {
		t.Fatalf("closed %d (%v), want only web's session on the listener, 0x100", n, rt.shut)
	}
}

func TestSweepWithoutTable(t *testing.T) {
	rt := &fakeRuntime{table: "No such table\n"}
	r, err := New(Config{Runtime: rt, Destination: "api", Table: "haconnect_conns", Frontends: []string{"public_listener"}})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := r.Sweep(fakeChecker{}); n != 0 || err != nil {
		t.Fatalf("an HTTP listener (no table): %d %v, want 0 and no error", n, err)
	}
}

// masterRuntime is a master CLI in front of workers: "@!<pid> <command>".
type masterRuntime struct{ workers map[string]*fakeRuntime }

func (m masterRuntime) Command(c string) (string, error) {
	if c == "show proc" {
		out := "#<PID>          <type>          <reloads>       <uptime>        <version>\n" +
			"9498            master          1 [failed: 0]   0d00h00m04s     2.6.12\n# workers\n"
		for pid := range m.workers {
			out += pid + "            worker          0               0d00h00m01s     2.6.12\n"
		}
		return out + "# programs\n\n", nil
	}
	target, rest, _ := strings.Cut(strings.TrimPrefix(c, "@!"), " ")
	return m.workers[target].Command(rest)
}

func TestSweepReachesOldWorkersThroughTheMaster(t *testing.T) {
	conn := func(port string) *fakeRuntime {
		return &fakeRuntime{
			table: "0x1a: key=127.0.0.1:" + port + "|" + web + " use=1 exp=30000\n",
			sess:  "0x100: proto=tcpv4 src=127.0.0.1:" + port + " fe=public_listener be=local_app srv=app ts=00\n",
		}
	}
	current, old := conn("4001"), conn("4002")
	r, err := New(Config{Runtime: masterRuntime{map[string]*fakeRuntime{"9554": current, "9509": old}},
		Destination: "echo", Table: "haconnect_conns", Frontends: []string{"public_listener"}})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := r.Sweep(fakeChecker{web: authz.Deny(authz.ReasonIntentionDeny)}); n != 2 || err != nil || len(current.shut) != 1 || len(old.shut) != 1 {
		t.Fatalf("closed %d (%v): current %v, old %v; want one in each worker", n, err, current.shut, old.shut)
	}
}

// flakyRuntime is a runtime API that HAProxy may not serve yet: down, it
// fails as a dial to a socket nobody created does.
type flakyRuntime struct {
	fakeRuntime
	down bool
}

func (f *flakyRuntime) Command(c string) (string, error) {
	if f.down {
		_, err := net.Dial("unix", "/nonexistent/haconnect/master.sock")
		return "", err
	}
	return f.fakeRuntime.Command(c)
}

func TestNotStartedHAProxyIsNotAWarning(t *testing.T) {
	var logs strings.Builder
	rt := &flakyRuntime{fakeRuntime: fakeRuntime{table: "No such table\n"}, down: true}
	r, err := New(Config{Runtime: rt, Destination: "api", Table: "haconnect_conns", Frontends: []string{"public_listener"},
		Logger: hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Debug})})
	if err != nil {
		t.Fatal(err)
	}
	r.sweepAndLog(fakeChecker{})
	if got := logs.String(); !strings.Contains(got, "[DEBUG]") || strings.Contains(got, "[WARN]") {
		t.Fatalf("before HAProxy first answers, a missing socket is for debugging only; logged:\n%s", got)
	}
	rt.down = false
	r.sweepAndLog(fakeChecker{})
	rt.down = true
	logs.Reset()
	r.sweepAndLog(fakeChecker{})
	if got := logs.String(); !strings.Contains(got, "[WARN]") || !strings.Contains(got, "no such file") {
		t.Fatalf("once HAProxy has answered, losing it is a warning; logged:\n%s", got)
	}
}
