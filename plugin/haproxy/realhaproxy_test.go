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
