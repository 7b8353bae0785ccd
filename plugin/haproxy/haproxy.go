// Package haproxy runs one HAProxy in master-worker mode and changes it
// without dropping traffic: configurations are validated with `haproxy -c`
// before they replace the running one, small changes go through the runtime
// API (stats socket), and the rest through a hitless reload (the master
// starts a new worker that inherits the listening sockets from the old one,
// which finishes its connections).
package haproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	Logger      hclog.Logger
	// Output receives HAProxy's own log lines (default: the logger at info).
	Output io.Writer
}

// Process is a running HAProxy master with its worker.
type Process struct {
	cfg     Config
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
	mu      sync.Mutex // serialises reloads and runtime commands
	workers int        // reloads done, for logs
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
	out, err := exec.CommandContext(ctx, binary, "-c", "-q", "-f", f.Name()).CombinedOutput()
	if err != nil {
		return fmt.Errorf("haproxy -c: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// WriteFileAtomic writes data to path through a temporary file in the same
// directory and a rename, so readers see the old or the new file, never a
// part of one.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
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
	out := cfg.Output
	if out == nil {
		out = cfg.Logger.Named("haproxy").StandardWriter(&hclog.StandardLoggerOptions{ForceLevel: hclog.Info})
	}
	cmd := exec.Command(bin, "-W", "-db", "-f", cfg.ConfigPath())
	cmd.Stdout, cmd.Stderr = out, out
	// HAProxy must not outlive haconnect, even if haconnect is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	p := &Process{cfg: cfg, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if _, err := p.waitWorker(ctx, 0); err != nil {
		p.Kill()
		return nil, err
	}
	cfg.Logger.Info("haproxy started", "pid", cmd.Process.Pid, "config", cfg.ConfigPath())
	return p, nil
}

// Done is closed when the master has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the master's exit error, once Done is closed.
func (p *Process) Err() error { return p.waitErr }

// Pid is the master's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// waitWorker waits until a worker other than oldPid answers `show info`,
// and returns its pid.
func (p *Process) waitWorker(ctx context.Context, oldPid int) (int, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case <-p.done:
			return 0, fmt.Errorf("haproxy exited: %v", p.waitErr)
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		if out, err := p.command("show info"); err == nil {
			if pid := infoField(out, "Pid"); pid != 0 && pid != oldPid {
				return pid, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, errors.New("haproxy worker did not come up on the admin socket within 15s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func infoField(out, name string) int {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Reload validates text, installs it and makes the master start a new
// worker with it. A rejected configuration leaves the running one in place
// and is returned as the error.
func (p *Process) Reload(ctx context.Context, text string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := Validate(ctx, p.cfg.Binary, text, p.cfg.Dir); err != nil {
		return err
	}
	out, err := p.command("show info")
	if err != nil {
		return fmt.Errorf("admin socket before reload: %w", err)
	}
	oldPid := infoField(out, "Pid")
	if err := WriteFileAtomic(p.cfg.ConfigPath(), []byte(text), 0o600); err != nil {
		return err
	}
	if err := p.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		return fmt.Errorf("signal reload: %w", err)
	}
	pid, err := p.waitWorker(ctx, oldPid)
	if err != nil {
		return err
	}
	p.workers++
	p.cfg.Logger.Info("haproxy reloaded", "worker_pid", pid, "reloads", p.workers)
	return nil
}

// Runtime sends commands to the admin socket, one connection each, and
// fails on the first answer that reports an error.
func (p *Process) Runtime(cmds ...string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cmds {
		out, err := p.command(c)
		if err != nil {
			return fmt.Errorf("runtime %q: %w", firstLine(c), err)
		}
		if bad := runtimeError(out); bad != "" {
			return fmt.Errorf("runtime %q: %s", firstLine(c), bad)
		}
	}
	return nil
}

// Command sends one command to the admin socket and returns the answer.
func (p *Process) Command(c string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.command(c)
}

func (p *Process) command(c string) (string, error) {
	conn, err := net.DialTimeout("unix", p.cfg.AdminSocket, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, c+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(bufio.NewReader(conn))
	return string(b), err
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// runtimeError recognises HAProxy's runtime API failure answers.
func runtimeError(out string) string {
	t := strings.TrimSpace(out)
	low := strings.ToLower(t)
	for _, bad := range []string{"unknown", "error", "can't", "cannot", "not found", "no such", "failed", "invalid", "require"} {
		if strings.Contains(low, bad) {
			return t
		}
	}
	return ""
}

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
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// ConfigPath is where the running configuration lives.
func (p *Process) ConfigPath() string { return p.cfg.ConfigPath() }
