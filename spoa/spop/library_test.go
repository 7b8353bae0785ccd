package spop_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/spoa/spop"
	"github.com/negasus/haproxy-spoe-go/logger"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/negasus/haproxy-spoe-go/worker"
)

// TestUnguardedLibraryCrashes is the reason Guard exists: a 5-byte frame
// sent straight to the SPOE library kills the whole process. It runs the
// library without the guard in a child process and expects it to die. If
// this test fails, the library has become safe on this input and the guard
// can be reviewed.
func TestUnguardedLibraryCrashes(t *testing.T) {
	if os.Getenv("HACONNECT_UNGUARDED_CHILD") == "1" {
		client, server := tcpPair(t)
		go worker.Handle(server, func(*request.Request) {}, logger.NewNop())
		_, _ = client.Write([]byte{0, 0, 0, 5, spop.TypeHaproxyHello, 0, 0, 0, 1})
		time.Sleep(2 * time.Second)
		return // survived
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestUnguardedLibraryCrashes$", "-test.count=1")
	cmd.Env = append(os.Environ(), "HACONNECT_UNGUARDED_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the unguarded library survived a 5-byte frame:\n%s", out)
	}
	if !strings.Contains(string(out), "panic") {
		t.Fatalf("the child failed without a panic: %v\n%s", err, out)
	}
	// The same bytes through the guard are refused cleanly.
	if reason, _ := serve(t, spop.Limits{}, nil, []byte{0, 0, 0, 5, spop.TypeHaproxyHello, 0, 0, 0, 1}); reason != spop.RejectFrameLength {
		t.Fatalf("guarded: reason %q, want %q", reason, spop.RejectFrameLength)
	}
}
