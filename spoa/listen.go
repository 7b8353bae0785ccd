package spoa

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ListenConfig says how the agent's SPOP socket is opened. Whoever can
// connect to it can ask for decisions, and whoever can listen in its place
// while the agent is down answers HAProxy instead of it: the socket is the
// agent's trust boundary.
type ListenConfig struct {
	// Mode is a unix socket's permission bits (default 0600: only the
	// agent's user, or root, may connect). 0660 with Group lets HAProxy's
	// group in.
	Mode os.FileMode
	// Group, when set, becomes a unix socket's group (a name or a gid).
	Group string
	// TLS, when set, makes a TCP listener speak TLS; ServerTLS builds one
	// that requires and verifies the client's certificate.
	TLS *tls.Config
	// Insecure allows a TCP listener on an address other than loopback
	// without TLS.
	Insecure bool
}

// DefaultSocketMode is a unix socket's mode unless told otherwise.
const DefaultSocketMode os.FileMode = 0o600

// Listen opens a listener for addr with the default ListenConfig.
func Listen(addr string) (net.Listener, error) { return ListenConfig{}.Listen(addr) }

// Listen opens a listener for an address written as host:port (TCP),
// unix:/path or /path (a unix socket; a stale socket file is replaced).
// A TCP address other than loopback is refused without TLS unless
// c.Insecure says so.
func (c ListenConfig) Listen(addr string) (net.Listener, error) {
	path, isUnix := strings.CutPrefix(addr, "unix:")
	if !isUnix && strings.HasPrefix(addr, "/") {
		path, isUnix = addr, true
	}
	if isUnix {
		if c.TLS != nil {
			return nil, fmt.Errorf("listen %s: TLS is for TCP; a unix socket is protected by its mode and directory", addr)
		}
		return c.listenUnix(path)
	}
	if c.TLS == nil && !c.Insecure && !isLoopback(addr) {
		return nil, fmt.Errorf("listen %s: not a loopback address, and no TLS: whoever reaches it could ask for decisions "+
			"and, while the agent is down, answer in its place (use a unix socket, TLS with client certificates, "+
			"or say it is acceptable with the insecure flag)", addr)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	if c.TLS != nil {
		l = tls.NewListener(l, c.TLS)
	}
	return l, nil
}

func (c ListenConfig) listenUnix(path string) (net.Listener, error) {
	mode := c.Mode
	if mode == 0 {
		mode = DefaultSocketMode
	}
	if mode&^0o777 != 0 {
		return nil, fmt.Errorf("listen unix %s: mode %#o is not a permission", path, mode)
	}
	gid := -1
	if c.Group != "" {
		var err error
		if gid, err = lookupGroup(c.Group); err != nil {
			return nil, fmt.Errorf("listen unix %s: %w", path, err)
		}
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen unix %s: another process is serving it", path)
		}
		_ = os.Remove(path)
	}
	// The socket is created with 0777 minus the umask: make that 0600 for
	// the moment between bind and chmod, so it is never looser than asked.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("listen unix %s: %w", path, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen unix %s: %w", path, err)
	}
	return l, nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// isLoopback reports whether a host:port names only this host.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ServerTLS returns a TLS configuration for the SPOP listener: the agent
// presents certFile/keyFile, and HAProxy must present a certificate
// clientCAFile's CAs signed (`server ... ssl crt <its cert> ca-file <the
// agent's CA> verify required` in the SPOE backend). The files are read
// again when they change (checked at each new connection), so a rotated
// certificate needs no restart; a rotation caught half-written keeps the
// previous files in use.
func ServerTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	f := &tlsFiles{paths: [3]string{certFile, keyFile, clientCAFile}}
	cfg, stamp, err := f.load()
	if err != nil {
		return nil, err
	}
	f.cfg, f.stamp = cfg, stamp
	return &tls.Config{MinVersion: tls.VersionTLS12, GetConfigForClient: f.current}, nil
}

type tlsFiles struct {
	paths [3]string // cert, key, client CA

	mu    sync.Mutex
	stamp [3]time.Time
	cfg   *tls.Config
}

func (f *tlsFiles) load() (*tls.Config, [3]time.Time, error) {
	var stamp [3]time.Time
	for i, p := range f.paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, stamp, err
		}
		stamp[i] = fi.ModTime()
	}
	cert, err := tls.LoadX509KeyPair(f.paths[0], f.paths[1])
	if err != nil {
		return nil, stamp, fmt.Errorf("TLS certificate: %w", err)
	}
	pem, err := os.ReadFile(f.paths[2])
	if err != nil {
		return nil, stamp, fmt.Errorf("TLS client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, stamp, errors.New("TLS client CA: no PEM certificate in " + f.paths[2])
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, stamp, nil
}

func (f *tlsFiles) current(*tls.ClientHelloInfo) (*tls.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	changed := false
	for i, p := range f.paths {
		if fi, err := os.Stat(p); err == nil && !fi.ModTime().Equal(f.stamp[i]) {
			changed = true
		}
	}
	if changed {
		if cfg, stamp, err := f.load(); err == nil {
			f.cfg, f.stamp = cfg, stamp
		}
	}
	return f.cfg, nil
}
