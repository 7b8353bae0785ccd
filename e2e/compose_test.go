package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	consulapi "github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// composeCommand is Compose v2 (`docker compose`) or v1 (`docker-compose`).
func composeCommand(t *testing.T) []string {
	if exec.Command("docker", "compose", "version").Run() == nil {
		return []string{"docker", "compose"}
	}
	if p, err := exec.LookPath("docker-compose"); err == nil {
		return []string{p}
	}
	t.Fatal("neither `docker compose` nor `docker-compose` is installed")
	return nil
}

// TestComposeMesh runs the repository's docker-compose.yml: the whole local
// mesh in real containers, allow -> deny -> allow, metrics, and a teardown
// that leaves nothing behind.
func TestComposeMesh(t *testing.T) {
	cli := harness.Docker(t)
	harness.Images(t)
	project := fmt.Sprintf("haconnect-e2e-%d", os.Getpid())
	ports := map[string]int{}
	env := os.Environ()
	for _, k := range []string{"HACONNECT_CONSUL_PORT", "HACONNECT_DASHBOARD_PORT", "HACONNECT_COUNTING_ADMIN_PORT", "HACONNECT_DASHBOARD_ADMIN_PORT"} {
		ports[k] = harness.FreePort(t)
		env = append(env, fmt.Sprintf("%s=%d", k, ports[k]))
	}
	base := composeCommand(t)
	compose := func(args ...string) (string, error) {
		cmd := exec.Command(base[0], append(append(base[1:], "-p", project, "-f", "docker-compose.yml"), args...)...)
		cmd.Dir, cmd.Env = harness.RepoRoot(), env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	down := func() {
		if out, err := compose("down", "-v", "--remove-orphans", "-t", "5"); err != nil {
			t.Errorf("compose down: %v\n%s", err, out)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := compose("logs", "--no-color", "--tail", "40")
			t.Logf("compose logs:\n%s", out)
		}
		down()
	})
	if out, err := compose("up", "-d"); err != nil {
		t.Fatalf("compose up: %v\n%s", err, out)
	}

	dashboard := func() (int, string) {
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/", ports["HACONNECT_DASHBOARD_PORT"]))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	harness.WaitFor(t, 90*time.Second, "dashboard -> counting through the mesh", func() bool {
		code, body := dashboard()
		return code == 200 && strings.Contains(body, `caller (x-haconnect-source): "dashboard"`) &&
			strings.Contains(body, "hello from counting")
	})

	cfg := consulapi.DefaultConfig()
	cfg.Address = fmt.Sprintf("127.0.0.1:%d", ports["HACONNECT_CONSUL_PORT"])
	consul, err := consulapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	setIntention := func(action consulapi.IntentionAction) {
		t.Helper()
		_, _, err := consul.ConfigEntries().Set(&consulapi.ServiceIntentionsConfigEntry{Kind: consulapi.ServiceIntentions, Name: "counting",
			Sources: []*consulapi.SourceIntention{{Name: "dashboard", Action: action}, {Name: "*", Action: consulapi.IntentionActionDeny}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	setIntention(consulapi.IntentionActionDeny)
	harness.WaitFor(t, 10*time.Second, "dashboard denied", func() bool {
		code, body := dashboard()
		return code == 502 && strings.Contains(body, "intention_deny")
	})
	setIntention(consulapi.IntentionActionAllow)
	harness.WaitFor(t, 10*time.Second, "dashboard allowed again", func() bool {
		code, _ := dashboard()
		return code == 200
	})

	metrics := scrape(t, fmt.Sprintf("127.0.0.1:%d", ports["HACONNECT_COUNTING_ADMIN_PORT"]))
	if m := find(metrics["haconnect_requests_total"], map[string]string{"source": "dashboard", "destination": "counting", "code_class": "2xx"}); m == nil || m.GetCounter().GetValue() < 1 {
		t.Errorf("no haconnect_requests_total{dashboard,counting,2xx} on counting's sidecar")
	}
	if m := find(metrics["haconnect_denied_total"], map[string]string{"source": "dashboard", "destination": "counting", "reason": "intention_deny"}); m == nil || m.GetCounter().GetValue() < 1 {
		t.Errorf("no haconnect_denied_total{dashboard,counting,intention_deny} on counting's sidecar")
	}

	// Teardown leaves no container, network or volume of the project.
	down()
	ctx := context.Background()
	label := filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+project))
	ctrs, _ := cli.ContainerList(ctx, container.ListOptions{All: true, Filters: label})
	nets, _ := cli.NetworkList(ctx, network.ListOptions{Filters: label})
	vols, _ := cli.VolumeList(ctx, volume.ListOptions{Filters: label})
	if len(ctrs)+len(nets)+len(vols.Volumes) > 0 {
		t.Fatalf("left after compose down: %d containers, %d networks, %d volumes", len(ctrs), len(nets), len(vols.Volumes))
	}
}
