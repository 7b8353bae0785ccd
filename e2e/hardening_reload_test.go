package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestSidecarReloadUnderLoadLosesNothing reloads the destination's HAProxy
// (SIGUSR2 to its master, as the sidecar's reload does) 40 times while 8
// keep-alive callers load it, each connection checked again every 300ms
// (-ttl). Each old worker finishes the requests it has and the new one
// takes the next: none may fail, and none may be denied because a stopping
// worker lost the SPOA's answer (authorization_unavailable). With HAProxy's
// default SPOE "option async", one to five requests of such a run were.
func TestSidecarReloadUnderLoadLosesNothing(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	api1 := m.addInstance(&instance{id: "api-1", args: []string{"-access-log"}}, "api")
	web := m.add("web", "web-1", "api")
	harness.WaitFor(t, 10*time.Second, "web -> api", func() bool {
		code, _, _ := web.call("api")
		return code == 200
	})
	l := startLoad(web, "api", 8)
	const reloads = 40
	for i := 0; i < reloads; i++ {
		time.Sleep(400 * time.Millisecond)
		worker := workerPid(t, api1.dir)
		if err := syscall.Kill(parentOf(t, worker), syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 10*time.Second, "a new worker", func() bool { return workerPid(t, api1.dir) != worker })
	}
	time.Sleep(400 * time.Millisecond)
	l.finish()
	for _, line := range strings.Split(api1.sidecar.Output(), "\n") {
		if strings.Contains(line, " 403 ") {
			t.Log(line) // the access log line: which frontend, how long
		}
	}
	l.check(t, "load across reloads of the destination")
}
