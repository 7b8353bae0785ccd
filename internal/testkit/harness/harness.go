// Package harness starts the real components haconnect's tests run against:
// a Consul dev agent, HAProxy, haconnect's own binaries and small apps, on
// loopback ports, each stopped when its test ends. A component that is
// missing fails the test with a message saying how to install it.
package harness

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

// FreePort returns a loopback TCP port that was free a moment ago, and
// that this process has not handed out before (a caller that asks for
// several at once, a Consul agent's five, must get distinct ones). Ports
// are drawn below the kernel's ephemeral range (ip_local_port_range,
// 32768-60999 by default): a port from that range, released, is soon the
// source port of some outgoing connection of any process here, and the
// server meant to listen on it then fails with "address already in use".
func FreePort(t testing.TB) int {
	t.Helper()
	for range 1000 {
		port := freePortLow + rand.IntN(freePortHigh-freePortLow)
		if _, seen := handedOut.LoadOrStore(port, true); seen {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue // another process holds it
		}
		l.Close()
		return port
	}
	t.Fatal("free port: none found below the ephemeral range")
	return 0
}

// The range FreePort draws from: below Linux's default ephemeral range, and
// above the ports services are usually configured on (Consul gives sidecar
// registrations without a port one from 21000-21255).
const freePortLow, freePortHigh = 22000, 32768

// handedOut holds the ports FreePort returned or found taken.
var handedOut sync.Map

// WaitFor polls cond every 10ms until it is true or timeout passes, and
// returns how long it took.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if cond() {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WaitSteady polls cond every 10ms until it has held without a break for
// hold, or fails after timeout. It is for state that settles late: a Consul
// health check that ran while a process restarted reports it up to one
// check interval afterwards, so "true once" is not "true from now on".
func WaitSteady(t testing.TB, timeout, hold time.Duration, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	var since time.Time // zero: cond did not hold at the last poll
	for {
		if cond() {
			if since.IsZero() {
				since = time.Now()
			}
			if time.Since(since) >= hold {
				return
			}
		} else {
			since = time.Time{}
		}
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s to hold for %s", timeout, what, hold)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WaitListening waits until addr accepts TCP connections.
func WaitListening(t testing.TB, addr string, timeout time.Duration) {
	t.Helper()
	WaitFor(t, timeout, addr+" to listen", func() bool {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// Process is a child process whose output is kept for failure reports.
type Process struct {
	Cmd  *exec.Cmd
	name string
	out  *lockedBuffer
	done chan struct{}
	err  error
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Start runs a command in its own process group; it is killed when the test
// ends and its output is printed if the test failed.
func Start(t testing.TB, name string, bin string, args ...string) *Process {
	t.Helper()
	return StartEnv(t, name, nil, bin, args...)
}

// StartEnv is Start with extra environment variables ("K=V").
func StartEnv(t testing.TB, name string, env []string, bin string, args ...string) *Process {
	t.Helper()
	p := &Process{name: name, out: &lockedBuffer{}, done: make(chan struct{})}
	p.Cmd = exec.Command(bin, args...)
	if env != nil {
		p.Cmd.Env = append(os.Environ(), env...)
	}
	p.Cmd.Stdout = p.out
	p.Cmd.Stderr = p.out
	p.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.Cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.Cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("--- output of %s ---\n%s", name, p.Output())
		}
	})
	return p
}

// Output returns what the process printed so far.
func (p *Process) Output() string { return p.out.String() }

// Kill stops the process group with SIGKILL and waits for it.
func (p *Process) Kill() {
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Wait waits up to timeout for the process to exit and returns its error.
func (p *Process) Wait(timeout time.Duration) (error, bool) {
	select {
	case <-p.done:
		return p.err, true
	case <-time.After(timeout):
		return nil, false
	}
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// findBinary looks for a program: $envVar, then PATH, then extra paths.
func findBinary(t testing.TB, envVar, name, hint string, extra ...string) string {
	t.Helper()
	if p := os.Getenv(envVar); p != "" {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, p := range extra {
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p
		}
	}
	t.Fatalf("%s not found (looked at $%s, PATH and %s): %s", name, envVar, strings.Join(extra, ", "), hint)
	return ""
}

// HAProxyBinary returns the haproxy to test with.
func HAProxyBinary(t testing.TB) string {
	return findBinary(t, "HACONNECT_HAPROXY", "haproxy", "run `make tools` (installs Debian's haproxy)", "/usr/sbin/haproxy")
}

// ConsulBinary returns the consul to test with.
func ConsulBinary(t testing.TB) string {
	return findBinary(t, "HACONNECT_CONSUL", "consul", "run `make tools` (builds consul v1.16.3 into .tools/)",
		filepath.Join(RepoRoot(), ".tools", "consul-1.16.3", "consul"))
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binary builds haconnect's commands once per test process and returns the
// path of the one named (e.g. "haconnect-spoa").
func Binary(t testing.TB, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "haconnect-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", buildDir+string(os.PathSeparator), "./cmd/...")
		cmd.Dir = RepoRoot()
		var out []byte
		out, buildErr = cmd.CombinedOutput()
		if buildErr != nil {
			buildErr = fmt.Errorf("go build ./cmd/...: %v\n%s", buildErr, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, name)
}
