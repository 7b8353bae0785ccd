// Package nomadcmd holds `haconnect nomad-hook` (the sidecar of a Nomad
// allocation, HAProxy in a container of its own) and `haconnect gc`.
package nomadcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	nomadapi "github.com/hashicorp/nomad/api"

	"github.com/haconnect/haconnect/internal/backoff"
	"github.com/haconnect/haconnect/internal/cli"
	"github.com/haconnect/haconnect/internal/sidecarcmd"
	"github.com/haconnect/haconnect/plugin/docker"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/nomad"
)

// nomadFlags are the Nomad API flags, over NOMAD_ADDR / NOMAD_TOKEN.
type nomadFlags struct{ addr, token string }

func (n *nomadFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&n.addr, "nomad-addr", "", "Nomad API address (default $NOMAD_ADDR or http://127.0.0.1:4646; unix:// for the task API socket)")
	fs.StringVar(&n.token, "nomad-token", "", "Nomad ACL token (default $NOMAD_TOKEN)")
}

func (n *nomadFlags) client() (*nomadapi.Client, error) {
	cfg := nomadapi.DefaultConfig()
	if n.addr != "" {
		cfg.Address = n.addr
	}
	if n.token != "" {
		cfg.SecretID = n.token
	}
	return nomadapi.NewClient(cfg)
}

// RunHook is `haconnect nomad-hook`.
func RunHook(ctx context.Context, args []string, stderr io.Writer) int {
	const name = "haconnect nomad-hook"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		o        sidecarcmd.Options
		nf       nomadFlags
		service  string
		launcher string
		image    string
		netCtr   string
		cpus     float64
		memoryMB int64
	)
	var haproxyUser string
	o.Register(fs, false)
	nf.register(fs)
	fs.StringVar(&service, "service", "", "the Connect service to serve (default: from the task name connect-proxy-<service>, or the group's only one)")
	fs.StringVar(&launcher, "launcher", "docker", "where HAProxy runs: docker (a container in the allocation's network namespace) or exec (a child process)")
	fs.StringVar(&image, "image", "haconnect/haproxy:latest", "docker launcher: HAProxy image (pulled only if missing)")
	fs.StringVar(&netCtr, "network-container", "", "docker launcher: container whose network namespace HAProxy joins (default: Nomad's nomad_init_<alloc ID>)")
	fs.Float64Var(&cpus, "cpus", 0, "docker launcher: CPU limit of the HAProxy container, in cores (0: none)")
	fs.Int64Var(&memoryMB, "memory", 0, "docker launcher: memory limit of the HAProxy container, MiB (0: none)")
	fs.StringVar(&haproxyUser, "haproxy-user", "", fmt.Sprintf("docker launcher: uid:gid HAProxy runs as, never root (default: the hook's own, or %d:%d when the hook runs as root)", docker.DefaultUID, docker.DefaultGID))
	if code, done := cli.Parse(fs, args, stderr); done {
		return code
	}
	if launcher != "docker" && launcher != "exec" {
		return cli.Fail(stderr, name, fmt.Errorf("-launcher %q: want docker or exec", launcher))
	}
	if cpus < 0 || memoryMB < 0 {
		return cli.Fail(stderr, name, errors.New("-cpus and -memory must not be negative"))
	}
	env, err := nomad.EnvFromOS()
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	if o.Sidecar.Dir == "" && env.SecretsDir != "" {
		o.Sidecar.Dir = filepath.Join(env.SecretsDir, "haconnect")
	}
	p, err := o.Prepare("haconnect-nomad-hook", stderr)
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	defer p.Close()
	nc, err := nf.client()
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	target, err := lookupWithRetry(ctx, nc, env, service, p)
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	p.Config.ProxyID = target.ProxyID
	p.Log.Info("serving the Connect sidecar of an allocation", "alloc_id", target.AllocID, "group", target.Group,
		"service", target.Service, "proxy_id", target.ProxyID, "upstreams", target.Upstreams, "launcher", launcher)

	if launcher == "docker" {
		dc, err := docker.New(ctx)
		if err != nil {
			return cli.Fail(stderr, name, err)
		}
		defer dc.Close()
		if netCtr == "" {
			if netCtr, err = docker.FindNetworkContainer(ctx, dc, env.AllocID); err != nil {
				return cli.Fail(stderr, name, fmt.Errorf("%w (name it with -network-container)", err))
			}
		}
		l := &docker.Launcher{
			Client:           dc,
			Image:            image,
			Name:             "haconnect-" + env.AllocID + "-" + target.Service,
			NetworkContainer: netCtr,
			Labels:           map[string]string{docker.LabelAllocID: env.AllocID, docker.LabelProxyID: target.ProxyID},
			NanoCPUs:         int64(cpus * 1e9),
			MemoryBytes:      memoryMB << 20,
		}
		if l.UID, l.GID, err = parseUser(haproxyUser); err != nil {
			return cli.Fail(stderr, name, err)
		}
		// A hook running in a task container finds where the working
		// directory is on the host, to mount it, and only it, into
		// HAProxy's container (not the Docker socket, not Nomad's task API
		// socket); on a host, the directory is mounted as it is.
		own, err := ownContainer(ctx, dc, env)
		if err != nil {
			return cli.Fail(stderr, name, err)
		}
		if own != "" {
			dir, err := filepath.Abs(p.Config.Dir)
			if err == nil {
				err = os.MkdirAll(dir, 0o700) // as the sidecar makes it
			}
			if err == nil {
				dir, err = filepath.EvalSymlinks(dir)
			}
			if err == nil {
				l.HostDir, err = docker.HostPath(ctx, dc, own, dir)
			}
			if err != nil {
				return cli.Fail(stderr, name, err)
			}
			p.Config.Dir = dir
		}
		p.Config.Launcher = l
	} else {
		p.Config.Launcher = haproxy.Exec{}
	}
	return sidecarcmd.Serve(ctx, p, stderr, name)
}

// parseUser reads -haproxy-user: empty (the launcher's default) or uid:gid,
// numbers, neither of them root's.
func parseUser(s string) (int, int, error) {
	if s == "" {
		return 0, 0, nil
	}
	u, g, ok := strings.Cut(s, ":")
	uid, err1 := strconv.Atoi(u)
	gid, err2 := strconv.Atoi(g)
	if !ok || err1 != nil || err2 != nil || uid <= 0 || gid <= 0 {
		return 0, 0, fmt.Errorf("-haproxy-user %q: want uid:gid, numbers above 0", s)
	}
	return uid, gid, nil
}

// lookupWithRetry reads the allocation, retrying while Nomad cannot be
// reached; a definite answer (no such group or service) is final.
func lookupWithRetry(ctx context.Context, nc *nomadapi.Client, env nomad.Env, service string, p *sidecarcmd.Prepared) (*nomad.Target, error) {
	retry := backoff.New(100*time.Millisecond, 5*time.Second)
	for {
		t, err := nomad.Lookup(ctx, nc, env, service)
		if err == nil {
			return t, nil
		}
		if ctx.Err() != nil || !isTransient(err) {
			return nil, err
		}
		p.Log.Warn("cannot read the allocation from Nomad: retrying", "error", err, "retry_in", retry.Next())
		if !retry.Wait(ctx) {
			return nil, ctx.Err()
		}
	}
}

// isTransient reports errors of reaching Nomad, as opposed to answers:
// Nomad's own refusal (404, 403, ...) or an allocation that names no
// sidecar are final.
func isTransient(err error) bool {
	var re *nomad.ResolveError
	var ue nomadapi.UnexpectedResponseError
	return !errors.As(err, &re) && !errors.As(err, &ue)
}

// ownContainer finds the container the hook itself runs in, by the labels
// Nomad's docker driver puts on task containers.
func ownContainer(ctx context.Context, dc *client.Client, env nomad.Env) (string, error) {
	if env.Task == "" {
		return "", nil
	}
	list, err := dc.ContainerList(ctx, container.ListOptions{Filters: filters.NewArgs(
		filters.Arg("label", "com.hashicorp.nomad.alloc_id="+env.AllocID),
		filters.Arg("label", "com.hashicorp.nomad.task_name="+env.Task))})
	if err != nil || len(list) != 1 {
		return "", err
	}
	return list[0].ID, nil
}

// RunGC is `haconnect gc`: it removes the HAProxy containers whose
// allocation is gone or terminal, for hooks that died without cleaning up.
func RunGC(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	const name = "haconnect gc"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var nf nomadFlags
	nf.register(fs)
	dryRun := fs.Bool("dry-run", false, "only list what would be removed")
	if code, done := cli.Parse(fs, args, stderr); done {
		return code
	}
	nc, err := nf.client()
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	dc, err := docker.New(ctx)
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	defer dc.Close()
	list, err := docker.Managed(ctx, dc)
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	removed, kept := 0, 0
	for _, c := range list {
		alloc := c.Labels[docker.LabelAllocID]
		if alloc == "" {
			continue
		}
		alive, err := nomad.Alive(ctx, nc, alloc)
		if err != nil {
			return cli.Fail(stderr, name, fmt.Errorf("allocation %s: %w (nothing removed for it)", alloc, err))
		}
		if alive {
			kept++
			continue
		}
		fmt.Fprintf(stdout, "allocation %s is gone: removing container %s (%s)\n", alloc, c.ID[:12], firstName(c.Names))
		if !*dryRun {
			if err := dc.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true}); err != nil {
				return cli.Fail(stderr, name, err)
			}
		}
		removed++
	}
	fmt.Fprintf(stdout, "%d removed, %d kept\n", removed, kept)
	return 0
}

func firstName(names []string) string {
	if len(names) == 0 {
		return ""
	}
	return names[0]
}
