package harness

import (
	"net"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// HAProxy is a running haproxy.
type HAProxy struct {
	Proc *Process
}

// StartHAProxy validates cfg with `haproxy -c`, starts it in the foreground
// and waits until every address in waitAddrs listens.
func StartHAProxy(t testing.TB, dir, cfg string, waitAddrs ...string) *HAProxy {
	t.Helper()
	bin := HAProxyBinary(t)
	path := WriteFile(t, dir, "haproxy.cfg", cfg)
	if out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c rejected the configuration: %v\n%s\n--- config ---\n%s", err, out, cfg)
	}
	h := &HAProxy{Proc: Start(t, "haproxy", bin, "-db", "-f", path)}
	for _, a := range waitAddrs {
		WaitListening(t, a, 10*time.Second)
	}
	return h
}

// Cutter forwards TCP connections to a target and can cut them all, as a
// network partition would: existing connections are reset and new ones
// refused until Restore.
type Cutter struct {
	Addr   string
	target string
	l      net.Listener
	mu     sync.Mutex
	cut    bool
	conns  map[net.Conn]struct{}
}

// NewCutter listens on a free loopback port and forwards to target.
func NewCutter(t testing.TB, target string) *Cutter {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &Cutter{Addr: l.Addr().String(), target: target, l: l, conns: map[net.Conn]struct{}{}}
	go c.serve()
	t.Cleanup(func() { l.Close(); c.Cut() })
	return c
}

func (c *Cutter) serve() {
	for {
		in, err := c.l.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		if c.cut {
			c.mu.Unlock()
			in.(*net.TCPConn).SetLinger(0)
			in.Close()
			continue
		}
		out, err := net.Dial("tcp", c.target)
		if err != nil {
			c.mu.Unlock()
			in.Close()
			continue
		}
		c.conns[in], c.conns[out] = struct{}{}, struct{}{}
		c.mu.Unlock()
		go c.pipe(in, out)
		go c.pipe(out, in)
	}
}

func (c *Cutter) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
}

// Cut resets every forwarded connection and refuses new ones.
func (c *Cutter) Cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cut = true
	for conn := range c.conns {
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		conn.Close()
		delete(c.conns, conn)
	}
}

// Restore lets connections through again.
func (c *Cutter) Restore() {
	c.mu.Lock()
	c.cut = false
	c.mu.Unlock()
}

// TempDir is t.TempDir, kept short: unix socket paths are limited to 108
// bytes.
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
