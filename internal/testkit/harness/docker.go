package harness

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/client"
)

// Docker returns a client for the machine's Docker engine, or fails the
// test saying that the engine is missing.
func Docker(t testing.TB) *client.Client {
	t.Helper()
	cli, err := client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = cli.Ping(ctx)
	}
	if err != nil {
		t.Fatalf("no Docker engine (the docker launcher tests need one; `docker info` must succeed): %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

var (
	imagesOnce sync.Once
	imagesErr  error
)

// Images builds haconnect's images from this checkout with
// scripts/images.sh (offline: a debootstrap base, FROM scratch), once per
// test process, so that tests never run stale images. Docker's layer cache
// makes a rebuild take seconds.
func Images(t testing.TB) {
	t.Helper()
	imagesOnce.Do(func() {
		cmd := exec.Command("bash", filepath.Join(RepoRoot(), "scripts", "images.sh"))
		cmd.Dir = RepoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			imagesErr = fmt.Errorf("scripts/images.sh: %v\n%s", err, out)
		}
	})
	if imagesErr != nil {
		t.Fatal(imagesErr)
	}
}

// RemoveContainers force-removes containers by name when the test ends
// (and now, if they exist), so that no test leaks one.
func RemoveContainers(t testing.TB, cli *client.Client, names ...string) {
	t.Helper()
	remove := func() {
		for _, n := range names {
			_ = cli.ContainerRemove(context.Background(), n, container.RemoveOptions{Force: true})
		}
	}
	remove()
	t.Cleanup(remove)
}
