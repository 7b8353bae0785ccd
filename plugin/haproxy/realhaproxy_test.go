package haproxy

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// testDir is a fresh directory for a test's HAProxy, by its real path:
// HAProxy reports socket paths resolved, and tests compare them.
func testDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// startForTest starts a real HAProxy with text, as the exec launcher does
// (master-worker, master CLI in dir, admin socket at admin); it is stopped
// when the test ends.
func startForTest(t *testing.T, dir, admin, text string) *Process {
	t.Helper()
	bin, err := BinaryPath("")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, err := Start(ctx, Config{Binary: bin, Dir: dir, AdminSocket: admin}, text)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(time.Second) })
	return p
}

// TestKillLeavesNoWorker: once Kill returns, no HAProxy process of the
// instance runs, the worker included (SIGKILL reaches it a moment after the
// master has exited, and the sidecar exits right after Kill).
func TestKillLeavesNoWorker(t *testing.T) {
	for range 5 {
		dir := testDir(t)
		admin := filepath.Join(dir, "admin.sock")
		p := startForTest(t, dir, admin, "global\n    stats socket "+admin+" mode 600 level admin\n"+
			"defaults\n    mode http\n    timeout client 5s\n    timeout connect 5s\n    timeout server 5s\n")
		worker, err := p.admin.WorkerPid()
		if err != nil {
			t.Fatal(err)
		}
		p.Kill()
		if groupAlive(p.cmd.Process.Pid) {
			t.Fatalf("a process of HAProxy's group (worker %d) still runs after Kill", worker)
		}
	}
}
