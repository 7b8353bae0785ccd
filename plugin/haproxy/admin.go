package haproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Admin speaks HAProxy's runtime API on a stats socket (level admin) or
// the master CLI; the typed commands are CLI's (runtime.go).
type Admin struct {
	CLI
	socket string
	mu     sync.Mutex // one command at a time
}

// NewAdmin returns a client for the socket at path.
func NewAdmin(path string) *Admin {
	a := &Admin{socket: path}
	a.CLI = CLI{a} // the typed commands go through a.Command
	return a
}

// Runtime sends commands, one connection each, and fails on the first
// answer that reports an error. No other command comes in between.
func (a *Admin) Runtime(cmds ...Command) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return CLI{locked{a}}.Runtime(cmds...)
}

// locked sends commands on an Admin whose lock the caller holds.
type locked struct{ a *Admin }

func (l locked) Command(c string) (string, error) { return l.a.command(c) }

// Command sends one command and returns the answer.
func (a *Admin) Command(c string) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.command(c)
}

func (a *Admin) command(c string) (string, error) {
	conn, err := net.DialTimeout("unix", a.socket, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, c+"\n"); err != nil {
		return "", err
	}
	// End the request: the master CLI, unlike a worker's, waits for more
	// commands until it reads the end of the stream.
	if uc, ok := conn.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
	b, err := io.ReadAll(bufio.NewReader(conn))
	return string(b), err
}

// WaitWorker waits until a worker other than oldPid answers, or gone is
// closed (HAProxy ended), and returns its pid.
func (a *Admin) WaitWorker(ctx context.Context, oldPid int, gone <-chan struct{}) (int, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case <-gone:
			return 0, errors.New("haproxy exited")
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		if pid, err := a.WorkerPid(); err == nil && pid != 0 && pid != oldPid {
			return pid, nil
		}
		if time.Now().After(deadline) {
			return 0, errors.New("no new haproxy worker answered on the admin socket within 15s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// HitlessReload is the reload sequence wherever HAProxy runs: validate the
// new text, install it, signal the master, and wait for a new worker.
func HitlessReload(ctx context.Context, a *Admin, configPath, text string, gone <-chan struct{},
	validate func(ctx context.Context, text string) error, signal func() error) (int, error) {
	if err := validate(ctx, text); err != nil {
		return 0, err
	}
	oldPid, err := a.WorkerPid()
	if err != nil {
		return 0, fmt.Errorf("admin socket before reload: %w", err)
	}
	if err := WriteFileAtomic(configPath, []byte(text), 0o600); err != nil {
		return 0, err
	}
	if err := signal(); err != nil {
		return 0, fmt.Errorf("signal reload: %w", err)
	}
	return a.WaitWorker(ctx, oldPid, gone)
}
