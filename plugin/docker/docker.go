// Package docker runs a sidecar's HAProxy as a container through the
// Docker Engine API: one container per allocation (or per sidecar), joined
// to the network namespace of another container (Nomad's pause container
// in bridge mode), sharing the sidecar's working directory (configuration,
// certificates, admin and SPOA sockets) at the same path. A restarted hook
// adopts the container it finds instead of starting a second one.
//
// The container gets that directory and nothing else of the host or of the
// hook's container (not the Docker socket the hook uses), runs HAProxy as
// an unprivileged user with no capabilities, no way to gain privileges and
// a read-only root filesystem, and none of the hook's environment.
package docker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/client"
	"github.com/docker/docker/errdefs"
	"github.com/docker/docker/pkg/stdcopy"
	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/plugin/haproxy"
)

// Labels haconnect puts on its containers.
const (
	LabelManaged = "com.haconnect.managed"
	LabelAllocID = "com.haconnect.alloc_id"
	LabelProxyID = "com.haconnect.proxy_id"
)

// Launcher starts HAProxy containers; it implements haproxy.Launcher.
type Launcher struct {
	Client *client.Client
	Image  string
	// Name is the container's name; it makes a second container for the
	// same sidecar impossible.
	Name string
	// NetworkContainer is the container whose network namespace HAProxy
	// joins (empty: the default bridge network).
	NetworkContainer string
	// HostDir is the working directory's path on the Docker host, when
	// the hook sees it elsewhere (it runs in a container: see HostPath).
	// Empty: the same path. Only this directory is mounted, at the path
	// the hook sees.
	HostDir string
	// UID and GID are the user HAProxy runs as. Zero: haconnect's own when
	// it does not run as root, else DefaultUID and DefaultGID. HAProxy
	// never runs as root.
	UID, GID    int
	Labels      map[string]string
	NanoCPUs    int64
	MemoryBytes int64
}

// The user HAProxy's container runs as when haconnect runs as root. Its
// ports are all above 1024; pick another uid (nomad-hook -haproxy-user)
// if a workload on the node already uses this one.
const (
	DefaultUID = 64000
	DefaultGID = 64000
)

// user is the uid and gid HAProxy runs as.
func (l *Launcher) user() (int, int) {
	switch {
	case l.UID != 0:
		return l.UID, l.GID
	case os.Getuid() != 0:
		return os.Getuid(), os.Getgid()
	}
	return DefaultUID, DefaultGID
}

// New connects to the Docker engine named by the environment (DOCKER_HOST,
// default unix:///var/run/docker.sock) and checks that it answers.
func New(ctx context.Context) (*client.Client, error) {
	c, err := client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, err
	}
	if _, err := c.Ping(ctx); err != nil {
		return nil, fmt.Errorf("docker engine not reachable: %w", err)
	}
	return c, nil
}

// Start implements haproxy.Launcher: it adopts a running container of the
// same name, or creates and starts one, then waits for its HAProxy worker.
func (l *Launcher) Start(ctx context.Context, cfg haproxy.Config, text string) (haproxy.Instance, error) {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	c := &Container{l: l, cfg: cfg, log: log, admin: haproxy.NewAdmin(cfg.AdminSocket), done: make(chan struct{})}
	uid, gid := l.user()
	if uid == 0 {
		return nil, errors.New("refusing to run the haproxy container as root")
	}
	if uid != os.Getuid() {
		// HAProxy reads the files haconnect writes, as another user.
		if err := haproxy.ShareDir(cfg.Dir, gid); err != nil {
			return nil, err
		}
	}
	existing, err := l.Client.ContainerInspect(ctx, l.Name)
	running := err == nil && existing.State != nil && (existing.State.Running || existing.State.Restarting)
	switch {
	case running && l.owns(existing) && l.confined(existing, cfg, uid, gid):
		c.id = existing.ID
		if existing.State.Restarting { // its restart policy is bringing it back
			if err := l.waitRunning(ctx, c.id); err != nil {
				return nil, err
			}
		}
		log.Info("adopting the running haproxy container", "container", l.Name, "id", short(c.id))
		if err := c.Reload(ctx, text); err != nil {
			return nil, fmt.Errorf("adopted container: %w", err)
		}
		c.watch()
		return c, nil
	case running && l.owns(existing):
		// Made by an older haconnect (the hook's volumes, root) or with
		// another user: adopting it would keep that.
		log.Warn("replacing a haproxy container that is not confined as configured", "container", l.Name, "id", short(existing.ID))
		if err := l.Client.ContainerRemove(ctx, existing.ID, container.RemoveOptions{Force: true}); err != nil {
			return nil, err
		}
	case err == nil:
		log.Info("removing a stopped or foreign haproxy container", "container", l.Name, "id", short(existing.ID))
		if err := l.Client.ContainerRemove(ctx, existing.ID, container.RemoveOptions{Force: true}); err != nil {
			return nil, err
		}
	case !errdefs.IsNotFound(err):
		return nil, fmt.Errorf("inspect %s: %w", l.Name, err)
	}
	// Sockets of an HAProxy that no longer runs: the new one, maybe
	// another user, must be able to bind them again.
	for _, sock := range []string{cfg.AdminSocket, cfg.MasterSocket()} {
		if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	// A new container reads its configuration at start. (An adopted one
	// got it through Reload, which installs a text only once it is valid.)
	if err := haproxy.WriteFileAtomic(cfg.ConfigPath(), []byte(text), 0o600); err != nil {
		return nil, err
	}
	if err := l.ensureImage(ctx, log); err != nil {
		return nil, err
	}
	id, err := l.create(ctx, cfg, uid, gid)
	if err != nil {
		return nil, err
	}
	c.id = id
	if err := l.Client.ContainerStart(ctx, id, container.StartOptions{}); err != nil {
		return nil, fmt.Errorf("start container: %w", err)
	}
	c.watch()
	if _, err := c.admin.WaitWorker(ctx, 0, c.done); err != nil {
		logs := c.logs(context.Background())
		_ = l.Client.ContainerRemove(context.Background(), id, container.RemoveOptions{Force: true})
		return nil, fmt.Errorf("haproxy container did not come up: %w\n%s", err, logs)
	}
	log.Info("haproxy container started", "container", l.Name, "id", short(id), "image", l.Image, "network", l.NetworkContainer)
	return c, nil
}

// waitRunning waits up to 15s for a restarting container to run.
func (l *Launcher) waitRunning(ctx context.Context, id string) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		c, err := l.Client.ContainerInspect(ctx, id)
		if err != nil {
			return err
		}
		if c.State != nil && c.State.Running && !c.State.Restarting {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("container %s still not running after 15s", short(id))
}

func (l *Launcher) owns(c container.InspectResponse) bool {
	if c.Config == nil || c.Config.Labels[LabelManaged] != "true" {
		return false
	}
	for k, v := range l.Labels {
		if c.Config.Labels[k] != v {
			return false
		}
	}
	return true
}

// ensureImage pulls the image only when it is missing locally.
func (l *Launcher) ensureImage(ctx context.Context, log hclog.Logger) error {
	if _, err := l.Client.ImageInspect(ctx, l.Image); err == nil {
		return nil
	}
	log.Info("pulling the haproxy image", "image", l.Image)
	rc, err := l.Client.ImagePull(ctx, l.Image, image.PullOptions{})
	if err != nil {
		return fmt.Errorf("image %s is not present and cannot be pulled: %w", l.Image, err)
	}
	defer rc.Close()
	_, err = io.Copy(io.Discard, rc)
	return err
}

// source is the working directory's path on the Docker host.
func (l *Launcher) source(cfg haproxy.Config) string {
	if l.HostDir != "" {
		return l.HostDir
	}
	return cfg.Dir
}

// confined reports whether a container runs HAProxy as create makes it:
// the working directory alone, the user, no capability, no new privileges,
// a read-only root filesystem.
func (l *Launcher) confined(c container.InspectResponse, cfg haproxy.Config, uid, gid int) bool {
	h := c.HostConfig
	if c.Config == nil || h == nil || c.Config.User != fmt.Sprintf("%d:%d", uid, gid) {
		return false
	}
	noNewPrivs := slices.ContainsFunc(h.SecurityOpt, func(o string) bool {
		return o == "no-new-privileges" || o == "no-new-privileges:true"
	})
	if !noNewPrivs || !slices.Contains(h.CapDrop, "ALL") || len(h.CapAdd) != 0 || h.Privileged || !h.ReadonlyRootfs ||
		len(h.VolumesFrom) != 0 || len(h.Binds) != 0 {
		return false
	}
	return len(c.Mounts) == 1 && c.Mounts[0].Source == l.source(cfg) && c.Mounts[0].Destination == cfg.Dir
}

func (l *Launcher) create(ctx context.Context, cfg haproxy.Config, uid, gid int) (string, error) {
	labels := map[string]string{LabelManaged: "true"}
	for k, v := range l.Labels {
		labels[k] = v
	}
	host := &container.HostConfig{
		RestartPolicy: container.RestartPolicy{Name: container.RestartPolicyUnlessStopped},
		Resources:     container.Resources{NanoCPUs: l.NanoCPUs, Memory: l.MemoryBytes},
		Init:          boolPtr(false),
		// The working directory alone: HAProxy writes only its sockets
		// there, and reads its configuration, certificates and Lua.
		Mounts:         []mount.Mount{{Type: mount.TypeBind, Source: l.source(cfg), Target: cfg.Dir}},
		ReadonlyRootfs: true,
		CapDrop:        []string{"ALL"},
		SecurityOpt:    []string{"no-new-privileges"},
	}
	if l.NetworkContainer != "" {
		host.NetworkMode = container.NetworkMode("container:" + l.NetworkContainer)
	}
	res, err := l.Client.ContainerCreate(ctx, &container.Config{
		Image:  l.Image,
		Cmd:    append(cfg.MasterArgs(), "-f", cfg.ConfigPath()), // after the image's "haproxy -W -db"
		Labels: labels,
		User:   fmt.Sprintf("%d:%d", uid, gid),
		// Env stays empty: the image's PATH and nothing of the hook's
		// environment, which holds its tokens.
	}, host, nil, nil, l.Name)
	if err != nil {
		return "", fmt.Errorf("create container %s: %w", l.Name, err)
	}
	return res.ID, nil
}

func boolPtr(b bool) *bool { return &b }

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// Container is a running HAProxy container; it implements haproxy.Instance.
type Container struct {
	l     *Launcher
	cfg   haproxy.Config
	log   hclog.Logger
	id    string
	admin *haproxy.Admin

	reloadMu sync.Mutex
	done     chan struct{}
	doneOnce sync.Once
	err      error
	stopping chan struct{}
}

// watch closes done when the container stops running by itself.
func (c *Container) watch() {
	c.stopping = make(chan struct{})
	go func() {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() { <-c.stopping; cancel() }()
		waitC, errC := c.l.Client.ContainerWait(ctx, c.id, container.WaitConditionNotRunning)
		select {
		case res := <-waitC:
			c.finish(fmt.Errorf("container %s exited with status %d", short(c.id), res.StatusCode))
		case err := <-errC:
			if ctx.Err() == nil {
				c.finish(fmt.Errorf("waiting for container %s: %w", short(c.id), err))
			}
		case <-c.stopping:
		}
	}()
}

func (c *Container) finish(err error) {
	c.doneOnce.Do(func() {
		c.err = err
		close(c.done)
	})
}

// Done implements haproxy.Instance.
func (c *Container) Done() <-chan struct{} { return c.done }

// Err implements haproxy.Instance.
func (c *Container) Err() error { return c.err }

// ConfigPath implements haproxy.Instance.
func (c *Container) ConfigPath() string { return c.cfg.ConfigPath() }

// Runtime implements haproxy.Instance.
func (c *Container) Runtime(cmds ...haproxy.Command) error { return c.admin.Runtime(cmds...) }

// Reload validates text with the container's own haproxy (`haproxy -c`
// through docker exec), installs it and signals the master (SIGUSR2).
func (c *Container) Reload(ctx context.Context, text string) error {
	c.reloadMu.Lock()
	defer c.reloadMu.Unlock()
	pid, err := haproxy.HitlessReload(ctx, c.admin, c.cfg.ConfigPath(), text, c.done, c.validate,
		func() error { return c.l.Client.ContainerKill(ctx, c.id, "USR2") })
	if err != nil {
		return err
	}
	c.log.Info("haproxy container reloaded", "id", short(c.id), "worker_pid", pid)
	return nil
}

// validate runs the container's own `haproxy -c` on text.
func (c *Container) validate(ctx context.Context, text string) error {
	check := filepath.Join(c.cfg.Dir, ".haproxy-check.cfg")
	if err := haproxy.WriteFileAtomic(check, []byte(text), 0o600); err != nil {
		return err
	}
	defer os.Remove(check)
	out, code, err := c.exec(ctx, "haproxy", "-c", "-q", "-f", check)
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("haproxy -c: exit %d: %s", code, strings.TrimSpace(out))
	}
	return nil
}

// exec runs a command in the container and returns its output and exit
// code.
func (c *Container) exec(ctx context.Context, cmd ...string) (string, int, error) {
	ex, err := c.l.Client.ContainerExecCreate(ctx, c.id, container.ExecOptions{Cmd: cmd, AttachStdout: true, AttachStderr: true})
	if err != nil {
		return "", 0, fmt.Errorf("exec %v: %w", cmd, err)
	}
	att, err := c.l.Client.ContainerExecAttach(ctx, ex.ID, container.ExecAttachOptions{})
	if err != nil {
		return "", 0, fmt.Errorf("exec %v: %w", cmd, err)
	}
	defer att.Close()
	var out bytes.Buffer
	if _, err := stdcopy.StdCopy(&out, &out, att.Reader); err != nil && !errors.Is(err, io.EOF) {
		return "", 0, err
	}
	insp, err := c.l.Client.ContainerExecInspect(ctx, ex.ID)
	if err != nil {
		return "", 0, err
	}
	return out.String(), insp.ExitCode, nil
}

func (c *Container) logs(ctx context.Context) string {
	rc, err := c.l.Client.ContainerLogs(ctx, c.id, container.LogsOptions{ShowStdout: true, ShowStderr: true, Tail: "30"})
	if err != nil {
		return ""
	}
	defer rc.Close()
	var out bytes.Buffer
	_, _ = stdcopy.StdCopy(&out, &out, rc)
	return out.String()
}

// Stop asks HAProxy to finish its connections (the image's stop signal is
// SIGUSR1) for up to grace, then removes the container.
func (c *Container) Stop(grace time.Duration) {
	if c.stopping != nil {
		select {
		case <-c.stopping:
		default:
			close(c.stopping)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), grace+30*time.Second)
	defer cancel()
	secs := int(grace.Seconds())
	if err := c.l.Client.ContainerStop(ctx, c.id, container.StopOptions{Signal: "SIGUSR1", Timeout: &secs}); err != nil && !errdefs.IsNotFound(err) {
		c.log.Warn("stopping the haproxy container", "id", short(c.id), "error", err)
	}
	if err := c.l.Client.ContainerRemove(ctx, c.id, container.RemoveOptions{Force: true}); err != nil && !errdefs.IsNotFound(err) {
		c.log.Error("removing the haproxy container", "id", short(c.id), "error", err)
		return
	}
	c.log.Info("haproxy container stopped and removed", "id", short(c.id))
}

// Managed lists haconnect's containers, with their labels.
func Managed(ctx context.Context, cli *client.Client) ([]container.Summary, error) {
	return cli.ContainerList(ctx, container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", LabelManaged+"=true"))})
}

// HostPath translates dir, a path inside the container id (the hook's own),
// to its path on the Docker host, through the bind mount or volume it lies
// on, so that the HAProxy container can mount that directory alone rather
// than every volume of the hook's container.
func HostPath(ctx context.Context, cli *client.Client, id, dir string) (string, error) {
	c, err := cli.ContainerInspect(ctx, id)
	if err != nil {
		return "", err
	}
	dir = filepath.Clean(dir)
	best, host := "", ""
	for _, m := range c.Mounts {
		if m.Source == "" || (m.Type != mount.TypeBind && m.Type != mount.TypeVolume) {
			continue
		}
		dest := filepath.Clean(m.Destination)
		rel, err := filepath.Rel(dest, dir)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || len(dest) <= len(best) {
			continue
		}
		best, host = dest, filepath.Join(m.Source, rel)
	}
	if host == "" {
		return "", fmt.Errorf("the working directory %s is on no bind mount or volume of container %s: "+
			"an HAProxy container cannot share it", dir, short(id))
	}
	return host, nil
}

// FindNetworkContainer finds the pause container Nomad creates for an
// allocation in bridge mode (named nomad_init_<allocID>).
func FindNetworkContainer(ctx context.Context, cli *client.Client, allocID string) (string, error) {
	name := "nomad_init_" + allocID
	c, err := cli.ContainerInspect(ctx, name)
	if err != nil {
		return "", fmt.Errorf("network namespace of allocation %s: container %s: %w", allocID, name, err)
	}
	return c.ID, nil
}
