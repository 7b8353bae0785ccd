// An upstream whose instances cannot be read must not hold back the rest
// of the sidecar.

package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestUnreadableUpstreamDoesNotBlockTheOthers registers web with two
// upstreams: api, healthy, and db in a datacenter Consul does not know
// ("nowhere"), whose health query fails. web's sidecar must configure
// HAProxy anyway: api answers 200, db's local port 503, and one log line
// names db with the error. A CA rotation must then still reach web's
// HAProxy (its public listener serves the re-issued leaf).
func TestUnreadableUpstreamDoesNotBlockTheOthers(t *testing.T) {
	m := newMesh(t)
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	api1 := m.add("api", "api-1")
	web := m.addWithUpstreams(&instance{id: "web-1"}, "web",
		api.Upstream{DestinationName: "api"},
		api.Upstream{DestinationName: "db", Datacenter: "nowhere"})

	harness.WaitFor(t, 20*time.Second, "web reaching api", func() bool {
		code, _, err := web.call("api")
		return err == nil && code == http.StatusOK
	})
	if code, body, err := web.call("db@nowhere"); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("db@nowhere's local port: %d %q %v, want 503", code, body, err)
	}
	const given = "upstream instances cannot be read"
	logged := func() int {
		n := 0
		for _, l := range strings.Split(web.sidecar.Output(), "\n") {
			if strings.Contains(l, given) && strings.Contains(l, "upstream=db@nowhere") {
				n++
				if !strings.Contains(l, "error=") {
					t.Errorf("the log line gives no error: %s", l)
				}
			}
		}
		return n
	}

	// A CA rotation: web's HAProxy must serve web's re-issued leaf, and
	// web must reach api with the new roots.
	webLeaf := readFile(t, filepath.Join(web.dir, "leaf.pem"))
	m.rotateCA(t)
	harness.WaitFor(t, 40*time.Second, "web's new leaf", func() bool {
		return readFile(t, filepath.Join(web.dir, "leaf.pem")) != webLeaf
	})
	web.waitServingLeaf(t, 10*time.Second, api1)
	harness.WaitFor(t, 20*time.Second, "web reaching api after the rotation", func() bool {
		code, _, err := web.call("api")
		return err == nil && code == http.StatusOK
	})
	if code, _, err := web.call("db@nowhere"); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("db@nowhere's local port after the rotation: %d %v, want 503", code, err)
	}
	if n := logged(); n != 1 {
		t.Fatalf("%d log lines name db@nowhere as unreadable, want 1:\n%s", n, web.sidecar.Output())
	}
}
