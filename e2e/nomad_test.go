package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/docker/go-connections/nat"
	consulapi "github.com/hashicorp/consul/api"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/plugin/docker"
	"github.com/haconnect/haconnect/plugin/nomad"
)

// fakeNomad serves GET /v1/allocation/<id> from nomad/api values, as the
// real agent's JSON, and 404 for allocations it does not know. No Nomad
// binary may run here; this is the whole of Nomad the hook talks to.
type fakeNomad struct {
	*httptest.Server
	mu     sync.Mutex
	allocs map[string]*nomadapi.Allocation
}

func newFakeNomad(t *testing.T) *fakeNomad {
	f := &fakeNomad{allocs: map[string]*nomadapi.Allocation{}}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, ok := strings.CutPrefix(r.URL.Path, "/v1/allocation/")
		f.mu.Lock()
		a := f.allocs[id]
		f.mu.Unlock()
		if !ok || a == nil {
			http.Error(w, "alloc not found", http.StatusNotFound)
			return
		}
		w.Header().Set("X-Nomad-Index", "10")
		_ = json.NewEncoder(w).Encode(a)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeNomad) set(id string, a *nomadapi.Allocation) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if a == nil {
		delete(f.allocs, id)
	} else {
		f.allocs[id] = a
	}
}

func ptr[T any](v T) *T { return &v }

// connectAlloc is an allocation of job "demo", group "api", with the
// Connect service api (port label 8080) and its injected sidecar task, as
// Nomad shapes it for `connect { sidecar_service {} }` in bridge mode.
func connectAlloc(id string) *nomadapi.Allocation {
	return &nomadapi.Allocation{
		ID: id, Namespace: "default", JobID: "demo", TaskGroup: "api",
		ClientStatus: nomadapi.AllocClientStatusRunning, DesiredStatus: nomadapi.AllocDesiredStatusRun,
		Job: &nomadapi.Job{ID: ptr("demo"), Name: ptr("demo"), TaskGroups: []*nomadapi.TaskGroup{{
			Name:     ptr("api"),
			Networks: []*nomadapi.NetworkResource{{Mode: "bridge"}},
			Services: []*nomadapi.Service{{Name: "api", PortLabel: "8080", Connect: &nomadapi.ConsulConnect{
				SidecarService: &nomadapi.ConsulSidecarService{},
				SidecarTask:    &nomadapi.SidecarTask{Driver: "docker", Config: map[string]any{"image": "haconnect/haconnect:latest"}},
			}}},
			Tasks: []*nomadapi.Task{
				{Name: "app", Driver: "docker"},
				{Name: "connect-proxy-api", Driver: "docker", Kind: "connect-proxy:api",
					Lifecycle: &nomadapi.TaskLifecycle{Hook: nomadapi.TaskLifecycleHookPrestart, Sidecar: true}},
			},
		}}},
	}
}

// allocation is what Nomad's docker driver would have made for one
// allocation: a pause container owning the network namespace (the sidecar
// port published on loopback) and the app inside it, plus Consul's view.
type allocation struct {
	id       string
	pause    string
	hostPort int
	hookDir  string
	hookEnv  []string
}

func startAllocation(t *testing.T, cli *client.Client, c *harness.Consul, nomadURL string) *allocation {
	t.Helper()
	ctx := context.Background()
	a := &allocation{id: fmt.Sprintf("%08x-0000-4000-8000-%012x", time.Now().UnixNano()&0xffffffff, os.Getpid()),
		hostPort: harness.FreePort(t), hookDir: harness.TempDir(t)}
	harness.RemoveContainers(t, cli, "nomad_init_"+a.id, "app-"+a.id, "haconnect-"+a.id+"-api")

	pause, err := cli.ContainerCreate(ctx, &container.Config{
		Image: "haconnect/haproxy:latest", Entrypoint: []string{"sleep", "infinity"},
		Labels:       map[string]string{"com.hashicorp.nomad.alloc_id": a.id},
		ExposedPorts: nat.PortSet{"21000/tcp": {}},
	}, &container.HostConfig{PortBindings: nat.PortMap{"21000/tcp": {{HostIP: "127.0.0.1", HostPort: fmt.Sprint(a.hostPort)}}}},
		nil, nil, "nomad_init_"+a.id)
	if err != nil {
		t.Fatal(err)
	}
	a.pause = pause.ID
	if err := cli.ContainerStart(ctx, pause.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	appDir := harness.TempDir(t)
	harness.WriteFile(t, appDir, "app.cfg", "defaults\n    mode http\n    timeout client 10s\nfrontend app\n    bind 127.0.0.1:8080\n"+
		"    http-request return status 200 content-type text/plain lf-string \"app source=%[req.hdr(x-haconnect-source)]\"\n")
	app, err := cli.ContainerCreate(ctx, &container.Config{Image: "haconnect/haproxy:latest", Cmd: []string{"-f", appDir + "/app.cfg"}},
		&container.HostConfig{NetworkMode: container.NetworkMode("container:" + pause.ID), Binds: []string{appDir + ":" + appDir}},
		nil, nil, "app-"+a.id)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.ContainerStart(ctx, app.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}

	registerNomadServices(t, c, a.id, a.hostPort, "0.0.0.0", 21000, 8080)
	a.hookEnv = append(hookEnv(a.id, nomadURL), "CONSUL_HTTP_ADDR="+c.Addr)
	return a
}

// registerNomadServices makes the registrations Nomad makes in Consul for
// connectAlloc's group: the service api (its app on appPort) and its
// sidecar proxy, public on port and binding bindAddr:bindPort.
func registerNomadServices(t *testing.T, c *harness.Consul, allocID string, port int, bindAddr string, bindPort, appPort int) {
	t.Helper()
	svcID := nomad.ServiceID(allocID, "api", "api", "8080")
	for _, reg := range []*consulapi.AgentServiceRegistration{
		{ID: svcID, Name: "api", Address: "127.0.0.1", Port: appPort},
		{Kind: consulapi.ServiceKindConnectProxy, ID: nomad.ProxyID(allocID, "api", "api", "8080"), Name: "api-sidecar-proxy",
			Address: "127.0.0.1", Port: port, Proxy: &consulapi.AgentServiceConnectProxyConfig{
				DestinationServiceName: "api", DestinationServiceID: svcID,
				LocalServiceAddress: "127.0.0.1", LocalServicePort: appPort,
				Config: map[string]any{"bind_address": bindAddr, "bind_port": bindPort, "protocol": "http"},
			}},
	} {
		if err := c.Client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
	}
}

// hookEnv is the Nomad part of the environment of connectAlloc's sidecar
// task.
func hookEnv(allocID, nomadURL string) []string {
	return []string{"NOMAD_ALLOC_ID=" + allocID, "NOMAD_GROUP_NAME=api", "NOMAD_TASK_NAME=connect-proxy-api",
		"NOMAD_JOB_NAME=demo", "NOMAD_ADDR=" + nomadURL}
}

// callPort makes one request as caller (a leaf from c) to an mTLS listener
// on a loopback port, and returns the status and body (the error as body).
func callPort(t *testing.T, c *harness.Consul, roots, caller string, port int) (int, string) {
	code, body, err := getOnce(harness.ClientTLS(c.IssueLeaf(t, caller), roots), fmt.Sprintf("https://127.0.0.1:%d/", port), 3*time.Second)
	if err != nil {
		return 0, err.Error()
	}
	return code, body
}

func (a *allocation) startHook(t *testing.T) *harness.Process {
	t.Helper()
	return harness.StartEnv(t, "nomad-hook "+a.id[:8], a.hookEnv, harness.Binary(t, "haconnect"), "nomad-hook",
		"-dir", a.hookDir, "-stop-grace", "2s", "-ttl", "300ms", "-log-level", "debug")
}

// haproxyContainers lists the HAProxy containers of the allocation.
func haproxyContainers(t *testing.T, cli *client.Client, allocID string) []container.Summary {
	t.Helper()
	list, err := cli.ContainerList(context.Background(), container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", docker.LabelAllocID+"="+allocID))})
	if err != nil {
		t.Fatal(err)
	}
	return list
}

func runningHAProxy(t *testing.T, cli *client.Client, allocID string) (container.Summary, bool) {
	list := haproxyContainers(t, cli, allocID)
	if len(list) == 1 && list[0].State == "running" {
		return list[0], true
	}
	return container.Summary{}, false
}

func TestNomadHookDocker(t *testing.T) {
	cli := harness.Docker(t)
	harness.Images(t)
	c := harness.StartConsul(t)
	c.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("*", deny))
	fn := newFakeNomad(t)
	a := startAllocation(t, cli, c, fn.URL)
	fn.set(a.id, connectAlloc(a.id))
	roots, _ := c.RootsPEM(t)
	call := func(caller string) (int, string) { return callPort(t, c, roots, caller, a.hostPort) }

	top := t // hooks outlive the subtest that starts them
	hook := a.startHook(top)
	var first container.Summary
	harness.WaitFor(t, 30*time.Second, "the HAProxy container running", func() bool {
		var ok bool
		first, ok = runningHAProxy(t, cli, a.id)
		return ok
	})

	t.Run("the container joins the allocation's network namespace and serves mTLS with the SPOA check", func(t *testing.T) {
		insp, err := cli.ContainerInspect(context.Background(), first.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(insp.HostConfig.NetworkMode); got != "container:"+a.pause {
			t.Fatalf("network mode %q, want container:%s", got, a.pause)
		}
		if insp.Config.Labels[docker.LabelProxyID] != nomad.ProxyID(a.id, "api", "api", "8080") {
			t.Fatalf("labels %v", insp.Config.Labels)
		}
		harness.WaitFor(t, 10*time.Second, "web allowed through the container", func() bool {
			code, body := call("web")
			return code == 200 && body == "app source=web"
		})
		if code, body := call("batch"); code != 403 || !strings.Contains(body, "intention_deny") {
			t.Fatalf("batch: %d %q, want 403 intention_deny", code, body)
		}
	})

	t.Run("a restarted hook adopts the container", func(t *testing.T) {
		hook.Kill()
		hook = a.startHook(top)
		harness.WaitFor(t, 20*time.Second, "the new hook adopting", func() bool {
			out := hook.Output()
			return strings.Contains(out, "adopting the running haproxy container") &&
				strings.Contains(out, "haproxy configuration applied")
		})
		list := haproxyContainers(t, cli, a.id)
		if len(list) != 1 || list[0].ID != first.ID {
			t.Fatalf("after the hook's restart: %d containers, want the same one (%s)", len(list), first.ID[:12])
		}
		if code, _ := call("web"); code != 200 {
			t.Fatalf("web after adoption: %d", code)
		}
	})

	t.Run("a killed container is started again and reported", func(t *testing.T) {
		if err := cli.ContainerKill(context.Background(), first.ID, "KILL"); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, 30*time.Second, "HAProxy serving again", func() bool {
			_, ok := runningHAProxy(t, cli, a.id)
			return ok && strings.Contains(hook.Output(), "haproxy exited unexpectedly")
		})
		harness.WaitFor(t, 10*time.Second, "web allowed again", func() bool {
			code, _ := call("web")
			return code == 200
		})
	})

	t.Run("SIGTERM stops and removes the container", func(t *testing.T) {
		if err := hook.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err, done := hook.Wait(30 * time.Second); !done || err != nil {
			t.Fatalf("hook after SIGTERM: exited=%v err=%v", done, err)
		}
		if n := len(haproxyContainers(t, cli, a.id)); n != 0 {
			t.Fatalf("%d HAProxy containers left after SIGTERM", n)
		}
	})

	t.Run("gc removes the containers of gone allocations only", func(t *testing.T) {
		hook = a.startHook(top)
		harness.WaitFor(t, 30*time.Second, "the HAProxy container running", func() bool {
			_, ok := runningHAProxy(t, cli, a.id)
			return ok
		})
		hook.Kill() // a hook that died hard leaves its container behind
		gc := func() string {
			p := harness.StartEnv(t, "gc", []string{"NOMAD_ADDR=" + fn.URL}, harness.Binary(t, "haconnect"), "gc")
			if err, done := p.Wait(30 * time.Second); !done || err != nil {
				t.Fatalf("gc: exited=%v err=%v\n%s", done, err, p.Output())
			}
			return p.Output()
		}
		if out := gc(); len(haproxyContainers(t, cli, a.id)) != 1 {
			t.Fatalf("gc removed the container of a live allocation:\n%s", out)
		}
		fn.set(a.id, nil) // the allocation is gone
		out := gc()
		if n := len(haproxyContainers(t, cli, a.id)); n != 0 {
			t.Fatalf("gc left %d containers of a gone allocation:\n%s", n, out)
		}
		if !strings.Contains(out, "allocation "+a.id+" is gone") {
			t.Fatalf("gc output: %s", out)
		}
	})
}
