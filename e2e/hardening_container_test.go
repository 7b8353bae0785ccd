package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/client"
	"github.com/docker/docker/pkg/stdcopy"
	consulapi "github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/docker"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/nomad"
)

// hookContainer runs `haconnect nomad-hook` as Nomad runs the sidecar task
// of mesh.nomad.hcl: in a container of the haconnect image, as root, with
// the Docker socket and the task's secrets directory mounted, and the
// labels Nomad's docker driver puts on task containers. It uses the host's
// network, where the test's Consul and fake Nomad listen on loopback (a
// job reaches them on the node's address).
func hookContainer(t *testing.T, cli *client.Client, a *allocation, secretsDir string, env []string) string {
	t.Helper()
	ctx := context.Background()
	name := "hook-" + a.id
	harness.RemoveContainers(t, cli, name)
	res, err := cli.ContainerCreate(ctx, &container.Config{
		Image: "haconnect/haconnect:latest",
		Cmd:   []string{"nomad-hook", "-stop-grace", "2s", "-ttl", "300ms", "-log-level", "debug"},
		Env:   append(slices.Clone(env), "NOMAD_SECRETS_DIR=/secrets"),
		Labels: map[string]string{"com.hashicorp.nomad.alloc_id": a.id, "com.hashicorp.nomad.task_name": "connect-proxy-api",
			"com.hashicorp.nomad.task_group_name": "api", "com.hashicorp.nomad.job_name": "demo"},
	}, &container.HostConfig{
		NetworkMode: "host",
		Mounts: []mount.Mount{
			{Type: mount.TypeBind, Source: secretsDir, Target: "/secrets"},
			{Type: mount.TypeBind, Source: "/var/run/docker.sock", Target: "/var/run/docker.sock"},
		},
	}, nil, nil, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.ContainerStart(ctx, res.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	return res.ID
}

func containerLogs(cli *client.Client, id string) string {
	rc, err := cli.ContainerLogs(context.Background(), id, container.LogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		return err.Error()
	}
	defer rc.Close()
	var out bytes.Buffer
	_, _ = stdcopy.StdCopy(&out, &out, rc)
	return out.String()
}

// procStatus reads the fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	return fields
}

// containerHAProxyPids are the host pids of the container's master and its workers.
func containerHAProxyPids(t *testing.T, master int) []int {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", master, master))
	if err != nil {
		t.Fatal(err)
	}
	pids := []int{master}
	for _, f := range strings.Fields(string(raw)) {
		pid, _ := strconv.Atoi(f)
		pids = append(pids, pid)
	}
	if len(pids) < 2 {
		t.Fatalf("haproxy master %d has no worker", master)
	}
	return pids
}

// TestHardeningHAProxyContainer: the HAProxy container the hook makes from
// inside a Nomad task gets the working directory and nothing else of the
// hook's container (not its Docker socket), runs as an unprivileged user
// with no capability and no way to gain one, on a read-only root
// filesystem, with none of the hook's environment, and still serves,
// reloads and answers the hook on its sockets.
func TestHardeningHAProxyContainer(t *testing.T) {
	cli := harness.Docker(t)
	harness.Images(t)
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	fn := newFakeNomad(t)
	a := startAllocation(t, cli, c, fn.URL)
	fn.set(a.id, connectAlloc(a.id))
	roots, _ := c.RootsPEM(t)

	random := make([]byte, 16)
	_, _ = rand.Read(random)
	secrets := map[string]string{
		"CONSUL_HTTP_AUTH": "operator:consul-basic-auth-password",
		"CONSUL_TOKEN":     "consul-token-value",
		"VAULT_TOKEN":      "vault-token-value",
		"NOMAD_TOKEN":      "nomad-token-value",
		"SECRET_X":         hex.EncodeToString(random),
	}
	env := slices.Clone(a.hookEnv)
	for k, v := range secrets {
		env = append(env, k+"="+v)
	}
	secretsDir := harness.TempDir(t)
	hook := hookContainer(t, cli, a, secretsDir, env)
	defer func() {
		if t.Failed() {
			t.Logf("hook:\n%s", containerLogs(cli, hook))
		}
	}()
	var ctr container.Summary
	harness.WaitFor(t, 30*time.Second, "the HAProxy container running", func() bool {
		var ok bool
		ctr, ok = runningHAProxy(t, cli, a.id)
		return ok
	})
	insp, err := cli.ContainerInspect(context.Background(), ctr.ID)
	if err != nil {
		t.Fatal(err)
	}
	workDir := filepath.Join(secretsDir, "haconnect")

	t.Run("it serves mTLS with the SPOA check", func(t *testing.T) {
		harness.WaitFor(t, 10*time.Second, "web allowed through the container", func() bool {
			code, body := callPort(t, c, roots, "web", a.hostPort)
			return code == 200 && body == "app source=web"
		})
		if code, body := callPort(t, c, roots, "batch", a.hostPort); code != 403 || !strings.Contains(body, "intention_deny") {
			t.Fatalf("batch: %d %q, want 403 intention_deny", code, body)
		}
	})

	t.Run("only the working directory is mounted", func(t *testing.T) {
		if len(insp.HostConfig.VolumesFrom) != 0 || len(insp.HostConfig.Binds) != 0 {
			t.Errorf("volumes from %v, binds %v: want the one mount of the working directory", insp.HostConfig.VolumesFrom, insp.HostConfig.Binds)
		}
		for _, m := range insp.Mounts {
			if strings.Contains(m.Source, "docker.sock") || strings.Contains(m.Destination, "docker.sock") {
				t.Errorf("the Docker socket is mounted: %+v", m)
			}
		}
		if len(insp.Mounts) != 1 || insp.Mounts[0].Source != workDir || insp.Mounts[0].Destination != "/secrets/haconnect" || !insp.Mounts[0].RW {
			t.Errorf("mounts %+v, want %s at /secrets/haconnect, writable, alone", insp.Mounts, workDir)
		}
	})

	uid, gid := docker.DefaultUID, docker.DefaultGID
	t.Run("HAProxy runs unprivileged", func(t *testing.T) {
		if want := fmt.Sprintf("%d:%d", uid, gid); insp.Config.User != want {
			t.Errorf("user %q, want %q", insp.Config.User, want)
		}
		if !slices.Contains(insp.HostConfig.CapDrop, "ALL") || len(insp.HostConfig.CapAdd) != 0 {
			t.Errorf("cap drop %v, cap add %v: want ALL dropped, none added", insp.HostConfig.CapDrop, insp.HostConfig.CapAdd)
		}
		if !slices.ContainsFunc(insp.HostConfig.SecurityOpt, func(o string) bool { return strings.HasPrefix(o, "no-new-privileges") }) {
			t.Errorf("security options %v, want no-new-privileges", insp.HostConfig.SecurityOpt)
		}
		if !insp.HostConfig.ReadonlyRootfs || insp.HostConfig.Privileged {
			t.Errorf("read-only root %v, privileged %v", insp.HostConfig.ReadonlyRootfs, insp.HostConfig.Privileged)
		}
		// What the kernel says of the running processes.
		for _, pid := range containerHAProxyPids(t, insp.State.Pid) {
			st := procStatus(t, pid)
			wantIDs := fmt.Sprintf("%d\t%d\t%d\t%d", uid, uid, uid, uid)
			if st["Uid"] != wantIDs || st["Gid"] != fmt.Sprintf("%d\t%d\t%d\t%d", gid, gid, gid, gid) {
				t.Errorf("haproxy %d: Uid %q Gid %q, want %d and %d", pid, st["Uid"], st["Gid"], uid, gid)
			}
			for _, capSet := range []string{"CapPrm", "CapEff", "CapBnd", "CapAmb"} {
				if st[capSet] != "0000000000000000" {
					t.Errorf("haproxy %d: %s %s, want none", pid, capSet, st[capSet])
				}
			}
			if st["NoNewPrivs"] != "1" {
				t.Errorf("haproxy %d: NoNewPrivs %q", pid, st["NoNewPrivs"])
			}
		}
	})

	t.Run("none of the hook's environment reaches HAProxy", func(t *testing.T) {
		for _, kv := range insp.Config.Env {
			name, _, _ := strings.Cut(kv, "=")
			if name != "PATH" {
				t.Errorf("the container's environment has %s", name)
			}
		}
		for _, pid := range containerHAProxyPids(t, insp.State.Pid) {
			raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range secrets {
				if strings.Contains(string(raw), v) {
					t.Errorf("haproxy %d holds %s in its environment", pid, k)
				}
			}
		}
	})

	t.Run("its files are readable by HAProxy's user only", func(t *testing.T) {
		owner := func(path string) (os.FileMode, int, int) {
			fi, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			return fi.Mode(), int(st.Uid), int(st.Gid)
		}
		// The hook (root) keeps the files; HAProxy's group alone reads them.
		for _, f := range []string{"leaf.pem", "roots.pem", "haproxy.cfg", "spoe.conf"} {
			mode, u, g := owner(filepath.Join(workDir, f))
			if mode.Perm() != 0o640 || u != 0 || g != gid {
				t.Errorf("%s: %v %d:%d, want -rw-r----- 0:%d", f, mode, u, g, gid)
			}
		}
		// HAProxy creates its sockets there, but cannot remove or replace
		// the hook's files (sticky), and nobody else gets in.
		if mode, u, g := owner(workDir); mode != os.ModeDir|os.ModeSticky|os.ModeSetgid|0o770 || u != 0 || g != gid {
			t.Errorf("working directory: %v %d:%d, want drwxrws--T 0:%d", mode, u, g, gid)
		}
		for _, s := range []string{"admin.sock", "master.sock"} {
			if mode, u, _ := owner(filepath.Join(workDir, s)); mode.Perm()&0o007 != 0 || u != uid {
				t.Errorf("%s: %v owned by %d, want HAProxy's, closed to others", s, mode, u)
			}
		}
		if mode, u, g := owner(filepath.Join(workDir, "spoa.sock")); mode.Perm() != 0o660 || u != 0 || g != gid {
			t.Errorf("spoa.sock: %v %d:%d, want srw-rw---- 0:%d", mode, u, g, gid)
		}
	})

	t.Run("a reload validates and loads a new configuration in the container", func(t *testing.T) {
		// An upstream changes the configuration's shape: the hook checks
		// it with the container's haproxy -c (as HAProxy's user, reading
		// the check file), signals the master and waits for the new
		// worker on the admin socket.
		svcID := nomad.ServiceID(a.id, "api", "api", "8080")
		if err := c.Client.Agent().ServiceRegister(&consulapi.AgentServiceRegistration{
			Kind: consulapi.ServiceKindConnectProxy, ID: nomad.ProxyID(a.id, "api", "api", "8080"), Name: "api-sidecar-proxy",
			Address: "127.0.0.1", Port: a.hostPort, Proxy: &consulapi.AgentServiceConnectProxyConfig{
				DestinationServiceName: "api", DestinationServiceID: svcID,
				LocalServiceAddress: "127.0.0.1", LocalServicePort: 8080,
				Config:    map[string]any{"bind_address": "0.0.0.0", "bind_port": 21000, "protocol": "http"},
				Upstreams: []consulapi.Upstream{{DestinationName: "db", LocalBindAddress: "127.0.0.1", LocalBindPort: 9191}},
			}}); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 20*time.Second, "the container reloaded", func() bool {
			return strings.Contains(containerLogs(cli, hook), "haproxy container reloaded")
		})
		out, err := haproxy.NewAdmin(filepath.Join(workDir, "admin.sock")).Command("show backend")
		if err != nil || !strings.Contains(out, "db") {
			t.Fatalf("show backend after the reload: %q %v", out, err)
		}
		if code, _ := callPort(t, c, roots, "web", a.hostPort); code != 200 {
			t.Fatalf("web after the reload: %d", code)
		}
	})

	t.Run("the hook stops and removes the container", func(t *testing.T) {
		timeout := 20
		if err := cli.ContainerStop(context.Background(), hook, container.StopOptions{Signal: "SIGTERM", Timeout: &timeout}); err != nil {
			t.Fatal(err)
		}
		if n := len(haproxyContainers(t, cli, a.id)); n != 0 {
			t.Fatalf("%d HAProxy containers left after the hook stopped", n)
		}
	})
}

// TestHardeningReplacesUnconfinedContainer: a running HAProxy container
// of the right name and labels that an older haconnect made (root, every
// capability, the working directory among other mounts) is replaced, not
// adopted, so that an upgrade does not keep the old privileges.
func TestHardeningReplacesUnconfinedContainer(t *testing.T) {
	cli := harness.Docker(t)
	harness.Images(t)
	ctx := context.Background()
	dir := harness.TempDir(t)
	name := fmt.Sprintf("haconnect-unconfined-%d", time.Now().UnixNano())
	harness.RemoveContainers(t, cli, name)
	labels := map[string]string{docker.LabelAllocID: "unconfined"}
	cfg := haproxy.Config{Dir: dir, AdminSocket: filepath.Join(dir, "admin.sock")}
	text := "global\n    stats socket " + cfg.AdminSocket + " mode 600 level admin expose-fd listeners\n" +
		"defaults\n    mode http\n    timeout client 5s\n    timeout connect 5s\n    timeout server 5s\n" +
		"frontend f\n    bind 127.0.0.1:8080\n    http-request return status 200\n"
	harness.WriteFile(t, dir, "haproxy.cfg", text)
	old, err := cli.ContainerCreate(ctx, &container.Config{
		Image: "haconnect/haproxy:latest", User: "0:0",
		Cmd:    append(cfg.MasterArgs(), "-f", cfg.ConfigPath()),
		Labels: map[string]string{docker.LabelManaged: "true", docker.LabelAllocID: "unconfined"},
	}, &container.HostConfig{Binds: []string{dir + ":" + dir, "/var/run/docker.sock:/var/run/docker.sock"}}, nil, nil, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.ContainerStart(ctx, old.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	harness.WaitFor(t, 10*time.Second, "the old container's HAProxy", func() bool {
		_, err := haproxy.NewAdmin(cfg.AdminSocket).WorkerPid()
		return err == nil
	})

	l := &docker.Launcher{Client: cli, Image: "haconnect/haproxy:latest", Name: name, Labels: labels}
	inst, err := l.Start(ctx, cfg, text)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Stop(time.Second)
	insp, err := cli.ContainerInspect(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if insp.ID == old.ID {
		t.Fatal("the unconfined container was adopted")
	}
	if want := fmt.Sprintf("%d:%d", docker.DefaultUID, docker.DefaultGID); insp.Config.User != want ||
		!slices.Contains(insp.HostConfig.CapDrop, "ALL") || !insp.HostConfig.ReadonlyRootfs || len(insp.Mounts) != 1 {
		t.Fatalf("the new container: user %q, cap drop %v, read-only root %v, mounts %+v", insp.Config.User,
			insp.HostConfig.CapDrop, insp.HostConfig.ReadonlyRootfs, insp.Mounts)
	}
	// The old HAProxy's sockets were root's: the new one bound its own.
	if _, err := haproxy.NewAdmin(cfg.AdminSocket).WorkerPid(); err != nil {
		t.Fatalf("admin socket of the new container: %v", err)
	}
}
