package haproxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// backendListener accepts connections on loopback, answers "ok" on each and
// holds it open until the test ends.
func backendListener(t *testing.T) (int, <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan struct{}, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			_, _ = io.WriteString(c, "ok")
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	return l.Addr().(*net.TCPAddr).Port, accepted
}

// readOK reports whether c delivers the backend's "ok" within 2s.
func readOK(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	b := make([]byte, 2)
	_, err := io.ReadFull(c, b)
	return err == nil && string(b) == "ok"
}

// closedWithin reports whether the peer closes c within d.
func closedWithin(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := c.Read(make([]byte, 1))
	return errors.Is(err, io.EOF) || (err != nil && !errors.Is(err, os.ErrDeadlineExceeded))
}

// showProc waits for the master CLI, which the master opens (again, after
// a reload) a moment after the new worker answers, and lists the processes.
func showProc(t *testing.T, master *Admin) []Proc {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		procs, err := master.ShowProc()
		if err == nil {
			return procs
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
}

// TestRuntimeAPIAgainstHAProxy drives every typed command against a real
// HAProxy started as the exec launcher does (master CLI included): server
// slots moved and parked, a stream found in a stick table and in the
// sessions and shut down, the workers listed and an old one reached
// through the master after a reload, and the certificate and CA file
// replaced in memory.
func TestRuntimeAPIAgainstHAProxy(t *testing.T) {
	dir := testDir(t)
	caA, caB := harness.NewForeignCA(t), harness.NewForeignCA(t)
	leaf1, leaf2 := caA.IssueHost(t, "leaf-one"), caA.IssueHost(t, "leaf-two")
	client := caB.IssueHost(t, "client")
	leafFile, rootsFile := filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "roots.pem")
	for f, data := range map[string]string{leafFile: leaf1.CertPEM + leaf1.KeyPEM, rootsFile: caA.CertPEM} {
		if err := WriteFileAtomic(f, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	appPort, accepted := backendListener(t)
	plain, tlsPort := harness.FreePort(t), harness.FreePort(t)
	admin := filepath.Join(dir, "admin.sock")
	text := fmt.Sprintf(`global
    stats socket %s mode 600 level admin expose-fd listeners
defaults
    mode tcp
    timeout client 30s
    timeout connect 2s
    timeout server 30s
frontend fe
    bind 127.0.0.1:%d
    tcp-request content track-sc0 src table tbl
    tcp-request content sc-inc-gpc0(0)
    default_backend be
frontend fe_tls
    bind 127.0.0.1:%d ssl crt %s ca-file %s verify required
    default_backend be
backend tbl
    stick-table type ip size 10 store gpc0
backend be
    server s0 127.0.0.1:1 disabled
`, admin, plain, tlsPort, leafFile, rootsFile)
	p := startForTest(t, dir, admin, text)
	a := NewAdmin(admin)
	master := NewAdmin(Config{Dir: dir}.MasterSocket())

	// The worker's stats socket is not the master CLI.
	if _, err := a.ShowProc(); !errors.Is(err, ErrNotMaster) {
		t.Fatalf("ShowProc on the stats socket: %v, want ErrNotMaster", err)
	}
	procs := showProc(t, master)
	worker, err := a.WorkerPid()
	if err != nil {
		t.Fatal(err)
	}
	if len(procs) != 2 || procs[0].Type != "master" || procs[0].PID != p.cmd.Process.Pid ||
		procs[1] != (Proc{PID: worker, Type: "worker"}) {
		t.Fatalf("ShowProc = %+v, want the master (%d) and worker %d", procs, p.cmd.Process.Pid, worker)
	}

	// A free slot moved to a live instance takes traffic; parked again,
	// it takes none.
	if err := a.Runtime(SetServerAddr("be", "s0", "127.0.0.1", appPort), SetServerState("be", "s0", ServerReady),
		SetServerHealth("be", "s0", HealthUp)); err != nil {
		t.Fatal(err)
	}
	held, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(plain))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if !readOK(held) {
		t.Fatal("the slot moved by set server addr/state/health does not reach the instance")
	}
	if err := a.Runtime(SetServerState("be", "nope", ServerMaint)); err == nil || !strings.Contains(err.Error(), "No such server") {
		t.Fatalf("a command HAProxy refuses: %v, want its answer as the error", err)
	}

	// The open stream is in the stick table and in the sessions.
	entries, err := a.ShowTable("tbl")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Key != "127.0.0.1" || entries[0].Use != 1 || entries[0].Data["gpc0"] != "1" ||
		!strings.HasPrefix(entries[0].ID, "0x") {
		t.Fatalf("ShowTable = %+v, want 127.0.0.1 in use once, gpc0=1", entries)
	}
	if _, err := a.ShowTable("nope"); !errors.Is(err, ErrNoSuchTable) {
		t.Fatalf("ShowTable of an undeclared table: %v, want ErrNoSuchTable", err)
	}
	session := func(c CLI, conn net.Conn) Session {
		t.Helper()
		sessions, err := c.ShowSessions()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range sessions {
			if s.Src == conn.LocalAddr().String() {
				return s
			}
		}
		t.Fatalf("no session from %s in %+v", conn.LocalAddr(), sessions)
		return Session{}
	}
	s := session(a.CLI, held)
	if s.Frontend != "fe" || s.Backend != "be" || s.Proto != "tcpv4" {
		t.Fatalf("session %+v, want fe -> be over tcpv4", s)
	}
	if shut, err := a.ShutdownSession(s.ID); !shut || err != nil {
		t.Fatalf("ShutdownSession(%s) = %v, %v", s.ID, shut, err)
	}
	if !closedWithin(held, 2*time.Second) {
		t.Fatal("the shut down session is still open")
	}
	// (An ended session's address may be reused at once, by the CLI's
	// own stream even: an address no stream can have stands for it.)
	if shut, err := a.ShutdownSession("0x1"); shut || err != nil {
		t.Fatalf("ShutdownSession of no session = %v, %v; want false, no error", shut, err)
	}

	// After a reload, the old worker finishing a stream is listed and
	// reached through the master.
	old, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(plain))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if !readOK(old) {
		t.Fatal("no stream through the old worker")
	}
	if err := a.Runtime(SetServerState("be", "s0", ServerMaint)); err != nil {
		t.Fatal(err)
	}
	if err := p.Reload(t.Context(), text+"# reloaded\n"); err != nil {
		t.Fatal(err)
	}
	procs = showProc(t, master)
	var current, older []int
	for _, pr := range procs {
		switch {
		case pr.Type == "worker" && pr.Old:
			older = append(older, pr.PID)
		case pr.Type == "worker":
			current = append(current, pr.PID)
		}
	}
	if len(older) != 1 || older[0] != worker || len(current) != 1 || current[0] == worker {
		t.Fatalf("after a reload ShowProc = %+v, want worker %d old and a new one", procs, worker)
	}
	if sessions, err := master.Worker(current[0]).ShowSessions(); err != nil {
		t.Fatal(err)
	} else {
		for _, s := range sessions {
			if s.Src == old.LocalAddr().String() {
				t.Fatalf("the new worker lists the old worker's stream: %+v", s)
			}
		}
	}
	s = session(master.Worker(worker), old)
	if shut, err := master.Worker(worker).ShutdownSession(s.ID); !shut || err != nil {
		t.Fatalf("ShutdownSession through the master = %v, %v", shut, err)
	}
	if !closedWithin(old, 2*time.Second) {
		t.Fatal("the old worker's stream shut down through the master is still open")
	}

	// The new worker starts with the slot parked: a new stream reaches no
	// instance.
	for len(accepted) > 0 {
		<-accepted
	}
	parked, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(plain))
	if err != nil {
		t.Fatal(err)
	}
	defer parked.Close()
	if readOK(parked) || len(accepted) != 0 {
		t.Fatal("a stream reached the instance through a slot in maintenance")
	}

	// Certificates: the client's CA is not trusted yet; once the CA file
	// and the certificate are replaced in memory, the handshake passes
	// and the new certificate is served.
	dialTLS := func() (*tls.Conn, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", "127.0.0.1:"+strconv.Itoa(tlsPort),
			&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{client.TLS}, MaxVersion: tls.VersionTLS12})
		return c, err
	}
	if c, err := dialTLS(); err == nil {
		c.Close()
		t.Fatal("a client certificate of an untrusted CA was accepted")
	}
	// (The certificate goes first: in HAProxy 2.6.12 a certificate
	// committed after a CA file is not served.)
	if err := a.Runtime(SetSSLCert(leafFile, leaf2.CertPEM+leaf2.KeyPEM), CommitSSLCert(leafFile),
		SetSSLCAFile(rootsFile, caB.CertPEM), CommitSSLCAFile(rootsFile)); err != nil {
		t.Fatal(err)
	}
	c, err := dialTLS()
	if err != nil {
		t.Fatalf("after set/commit ssl ca-file, the new CA's client is refused: %v", err)
	}
	defer c.Close()
	if cn := c.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "leaf-two" {
		t.Fatalf("after set/commit ssl cert, HAProxy serves %q, want leaf-two", cn)
	}
	if got, err := os.ReadFile(leafFile); err != nil || string(got) != leaf1.CertPEM+leaf1.KeyPEM {
		t.Fatalf("the runtime API changed the file on disk (%v)", err)
	}
}

func TestParseProcs(t *testing.T) {
	out := "#<PID>          <type>          <reloads>       <uptime>        <version>      \n" +
		"9498            master          1 [failed: 0]   0d00h00m04s     2.6.12-1+deb12u4\n" +
		"# workers\n9554            worker          0               0d00h00m01s     2.6.12-1+deb12u4\n" +
		"# old workers\n9509            worker          1               0d00h00m09s     2.6.12-1+deb12u4\n" +
		"# programs\n\n"
	procs, err := parseProcs(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []Proc{{PID: 9498, Type: "master"}, {PID: 9554, Type: "worker"}, {PID: 9509, Type: "worker", Old: true}}
	if fmt.Sprint(procs) != fmt.Sprint(want) {
		t.Fatalf("parseProcs = %+v, want %+v", procs, want)
	}
	if _, err := parseProcs("Unknown command, but maybe one of the following ones is a better match:\n"); !errors.Is(err, ErrNotMaster) {
		t.Fatalf("a worker's answer: %v, want ErrNotMaster", err)
	}
}

// The commands keep HAProxy's spelling, a payload ending on the empty line
// that the command's own newline adds.
func TestCommandText(t *testing.T) {
	for _, c := range []struct {
		cmd  Command
		want string
	}{
		{SetServerAddr("upstream_api", "s2", "10.0.0.1", 8443), "set server upstream_api/s2 addr 10.0.0.1 port 8443"},
		{SetServerState("upstream_api", "s2", ServerMaint), "set server upstream_api/s2 state maint"},
		{SetServerHealth("upstream_api", "s2", HealthUp), "set server upstream_api/s2 health up"},
		{SetSSLCert("/d/leaf.pem", "CERT\nKEY"), "set ssl cert /d/leaf.pem <<\nCERT\nKEY\n"},
		{CommitSSLCert("/d/leaf.pem"), "commit ssl cert /d/leaf.pem"},
		{SetSSLCAFile("/d/roots.pem", "ROOT\n"), "set ssl ca-file /d/roots.pem <<\nROOT\n"},
		{CommitSSLCAFile("/d/roots.pem"), "commit ssl ca-file /d/roots.pem"},
	} {
		if c.cmd.text != c.want {
			t.Errorf("%q, want %q", c.cmd.text, c.want)
		}
	}
	if s := SetSSLCert("/d/leaf.pem", "CERT\n").String(); s != "set ssl cert /d/leaf.pem <<" {
		t.Errorf("String() = %q: a certificate must not reach logs and errors", s)
	}
}
