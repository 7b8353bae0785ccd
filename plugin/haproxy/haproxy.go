// Package haproxy runs one HAProxy in master-worker mode and changes it
// without dropping traffic: configurations are validated with `haproxy -c`
// before they replace the running one, small changes go through the runtime
// API (stats socket), and the rest through a hitless reload (the master
// starts a new worker that inherits the listening sockets from the old one,
// which finishes its connections).
package haproxy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config describes the HAProxy to run.
type Config struct {
	// Binary is the haproxy executable (default: haproxy on PATH, then
	// /usr/sbin/haproxy).
	Binary string
	// Dir holds haproxy.cfg and the master socket.
	Dir string
	// AdminSocket is the stats socket the configuration declares (level
	// admin, expose-fd listeners); the runtime API is spoken there.
	AdminSocket string
	// Logger also receives HAProxy's own log lines, at info.
	Logger hclog.Logger
}

// Instance is a running HAProxy, wherever it runs: a child process (exec
// launcher) or a container (plugin/docker).
type Instance interface {
	// Reload validates text and makes HAProxy run it without dropping
	// connections; a rejected text leaves the running one in place.
	Reload(ctx context.Context, text string) error
	// Runtime sends runtime API commands.
	Runtime(cmds ...Command) error
	// Stop finishes connections for up to grace, then ends HAProxy.
	Stop(grace time.Duration)
	// Done is closed when HAProxy ended by itself; Err says why.
	Done() <-chan struct{}
	Err() error
	ConfigPath() string
}

// Launcher starts an Instance running text as its configuration.
type Launcher interface {
	Start(ctx context.Context, cfg Config, text string) (Instance, error)
}

// Exec runs HAProxy as a child process.
type Exec struct{}

// Start implements Launcher.
func (Exec) Start(ctx context.Context, cfg Config, text string) (Instance, error) {
	return Start(ctx, cfg, text)
}

// Process is a running HAProxy master with its worker.
type Process struct {
	cfg      Config
	cmd      *exec.Cmd
	done     chan struct{}
	waitErr  error
	admin    *Admin
	reloadMu sync.Mutex
	workers  int // reloads done, for logs
}

// BinaryPath finds haproxy.
func BinaryPath(configured string) (string, error) {
	if configured != "" {
		return configured, nil
	}
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/haproxy"); err == nil {
		return "/usr/sbin/haproxy", nil
	}
	return "", errors.New("haproxy not found on PATH or at /usr/sbin/haproxy")
}

// ConfigPath is where the running configuration lives.
func (c Config) ConfigPath() string { return filepath.Join(c.Dir, "haproxy.cfg") }

// MasterSocket is the master CLI's socket. Through it (`@!<pid> <command>`)
// the runtime API of every worker is reachable, including old workers still
// finishing their connections after a reload, which the stats socket, held
// by the newest worker, no longer reaches.
func (c Config) MasterSocket() string { return filepath.Join(c.Dir, "master.sock") }

// MasterArgs are the command-line flags that open the master CLI.
func (c Config) MasterArgs() []string { return []string{"-S", c.MasterSocket() + ",mode,600"} }

// Validate checks a configuration with `haproxy -c` without touching the
// running one. The error carries HAProxy's explanation.
func Validate(ctx context.Context, binary, text string, dir string) error {
	f, err := os.CreateTemp(dir, ".haproxy-check-*.cfg")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	f.Close()
	check := exec.CommandContext(ctx, binary, "-c", "-q", "-f", f.Name())
	check.Env = Env(os.Environ())
	out, err := check.CombinedOutput()
	if err != nil {
		return fmt.Errorf("haproxy -c: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// WriteFileAtomic writes data to path through a temporary file in the same
// directory and a rename, so readers see the old or the new file, never a
// part of one. In a directory shared with HAProxy's group (ShareDir), the
// file belongs to that group and the group may read it.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if gid, ok := sharedGroup(filepath.Dir(path)); ok {
		if err := f.Chown(-1, gid); err != nil {
			f.Close()
			return err
		}
		mode |= 0o040
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Start validates text, writes it as the configuration and starts HAProxy,
// returning once the worker answers on the admin socket.
func Start(ctx context.Context, cfg Config, text string) (*Process, error) {
	bin, err := BinaryPath(cfg.Binary)
	if err != nil {
		return nil, err
	}
	cfg.Binary = bin
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if err := Validate(ctx, bin, text, cfg.Dir); err != nil {
		return nil, err
	}
	if err := WriteFileAtomic(cfg.ConfigPath(), []byte(text), 0o600); err != nil {
		return nil, err
	}
	out := cfg.Logger.Named("haproxy").StandardWriter(&hclog.StandardLoggerOptions{ForceLevel: hclog.Info})
	cmd := exec.Command(bin, slices.Concat([]string{"-W", "-db"}, cfg.MasterArgs(), []string{"-f", cfg.ConfigPath()})...)
	cmd.Env = Env(os.Environ())
	cmd.Stdout, cmd.Stderr = out, out
	// HAProxy must not outlive haconnect, even if haconnect is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	p := &Process{cfg: cfg, cmd: cmd, done: make(chan struct{}), admin: NewAdmin(cfg.AdminSocket)}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if _, err := p.admin.WaitWorker(ctx, 0, p.done); err != nil {
		p.Kill()
		return nil, fmt.Errorf("%w (haproxy: %v)", err, p.waitErr)
	}
	cfg.Logger.Info("haproxy started", "pid", cmd.Process.Pid, "config", cfg.ConfigPath())
	return p, nil
}

// passedEnv is all of haconnect's environment HAProxy gets. HAProxy talks
// to neither Consul, Nomad nor Vault, and what it inherits stays readable
// in /proc/<pid>/environ for as long as it runs; a deny-list of token names
// would miss the next one (CONSUL_HTTP_AUTH, CONSUL_TOKEN, VAULT_TOKEN, ...).
// The rendered configuration sets what its Lua reads (setenv HACONNECT_*)
// itself.
var passedEnv = []string{"PATH", "TZ"}

// Env is the environment HAProxy runs with: the variables of env that
// passedEnv names, nothing else. It is never nil: an exec.Cmd with a nil
// Env inherits the whole environment.
func Env(env []string) []string {
	out := []string{}
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if slices.Contains(passedEnv, name) {
			out = append(out, kv)
		}
	}
	return out
}

// Done is closed when the master has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the master's exit error, once Done is closed.
func (p *Process) Err() error { return p.waitErr }

// Reload validates text, installs it and makes the master start a new
// worker with it. A rejected configuration leaves the running one in place
// and is returned as the error.
func (p *Process) Reload(ctx context.Context, text string) error {
	p.reloadMu.Lock()
	defer p.reloadMu.Unlock()
	pid, err := HitlessReload(ctx, p.admin, p.cfg.ConfigPath(), text, p.done,
		func(ctx context.Context, text string) error { return Validate(ctx, p.cfg.Binary, text, p.cfg.Dir) },
		func() error { return p.cmd.Process.Signal(syscall.SIGUSR2) })
	if err != nil {
		return err
	}
	p.workers++
	p.cfg.Logger.Info("haproxy reloaded", "worker_pid", pid, "reloads", p.workers)
	return nil
}

// Runtime sends commands to the admin socket (see Admin.Runtime).
func (p *Process) Runtime(cmds ...Command) error { return p.admin.Runtime(cmds...) }

// Stop asks HAProxy to finish its connections (soft stop) and waits up to
// grace, then kills it. It never leaves a process behind.
func (p *Process) Stop(grace time.Duration) {
	_ = p.cmd.Process.Signal(syscall.SIGUSR1)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	p.Kill()
}

// Kill stops the whole process group at once.
func (p *Process) Kill() {
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
	// The master's exit does not mean its workers are gone: SIGKILL is
	// delivered when each is next scheduled, and a caller that returns
	// (the sidecar exiting) must not leave one running even briefly.
	waitGroupGone(pgid, 2*time.Second)
}

// waitGroupGone waits until no process of the process group pgid is alive
// (zombies waiting for their reaper do not count), or timeout passes.
func waitGroupGone(pgid int, timeout time.Duration) {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if !groupAlive(pgid) {
			return
		}
	}
}

// groupAlive reports whether a process of group pgid runs, from /proc.
func groupAlive(pgid int) bool {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// After "(comm) ": state, ppid, pgrp.
		_, rest, ok := strings.Cut(string(b), ") ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) > 2 && f[0] != "Z" && f[0] != "X" && f[2] == strconv.Itoa(pgid) {
			return true
		}
	}
	return false
}

// ConfigPath is where the running configuration lives.
func (p *Process) ConfigPath() string { return p.cfg.ConfigPath() }
