// Package spoa is haconnect's SPOE agent: HAProxy sends it the client
// certificate of each inbound mTLS connection (message "haconnect-authz",
// args cert=ssl_c_der and optionally target=<destination>), and it answers
// with session variables HAProxy's rules act on:
//
//	<prefix>.auth    bool    the caller may proceed
//	<prefix>.source  string  the caller's service name
//	<prefix>.spiffe  string  the caller's SPIFFE ID
//	<prefix>.reason  string  why (see authz.Reason)
//	<prefix>.ttl_ms  int     how long HAProxy may reuse the answer on this connection
//
// The wire protocol is spoken by github.com/negasus/haproxy-spoe-go behind
// spop.Guard, which keeps malformed input away from it.
package spoa

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/negasus/haproxy-spoe-go/action"
	spoe "github.com/negasus/haproxy-spoe-go/agent"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/netutil"

	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
)

// The SPOE contract; see the README's "SPOA standalone" section.
const (
	MessageName = "haconnect-authz"
	ArgCert     = "cert"
	ArgTarget   = "target"

	VarAuth   = "auth"
	VarSource = "source"
	VarSPIFFE = "spiffe"
	VarReason = "reason"
	VarTTL    = "ttl_ms"
)

// Decider makes authorization decisions; *authz.Authorizer is the real one.
type Decider interface {
	Decide(target string, der []byte) *authz.Decision
}

// Config configures a Server.
type Config struct {
	Decider Decider
	// Target is the destination used when a message carries no target arg.
	Target string
	// TTL is sent as ttl_ms: how long HAProxy may reuse a decision on an
	// open connection before asking again (default 1s).
	TTL    time.Duration
	Logger hclog.Logger
	// Limits bound each SPOP connection; MaxConns bounds their number
	// (default 1024).
	Limits   spop.Limits
	MaxConns int
	// Registerer receives the server's metrics (nil: not registered).
	Registerer prometheus.Registerer
}

// Server answers SPOE authorization messages.
type Server struct {
	cfg      Config
	log      hclog.Logger
	ttl      any // boxed once: the library takes values as `any`
	rejected *prometheus.CounterVec
	panics   prometheus.Counter
}

// NewServer validates cfg and creates a Server.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Decider == nil {
		return nil, errors.New("spoa: no decider")
	}
	if cfg.TTL <= 0 {
		cfg.TTL = time.Second
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 1024
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	s := &Server{
		cfg: cfg,
		log: cfg.Logger,
		ttl: int(cfg.TTL / time.Millisecond),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "frames_rejected_total",
			Help: "SPOP connections closed because of an invalid frame, by reason.",
		}, []string{"reason"}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "handler_panics_total",
			Help: "Messages whose handling panicked (the caller was denied).",
		}),
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(s.rejected); err != nil {
			return nil, err
		}
		if err := cfg.Registerer.Register(s.panics); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Serve answers SPOP connections on l until ctx is done or l fails. It
// closes l and, when ctx is done, the connections still open (HAProxy
// reconnects to whichever agent answers next).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	guarded := &spop.Listener{
		Listener: netutil.LimitListener(l, s.cfg.MaxConns),
		Limits:   s.cfg.Limits,
		OnReject: s.onReject,
	}
	var once sync.Once
	stop := func() { once.Do(func() { _ = l.Close() }) }
	go func() {
		<-ctx.Done()
		stop()
	}()
	err := spoe.New(s.Handle, libLogger{s.log}).Serve(guarded)
	stop()
	if ctx.Err() != nil {
		guarded.CloseConns()
		return nil
	}
	return err
}

func (s *Server) onReject(reason string, err error) {
	s.rejected.WithLabelValues(reason).Inc()
	s.log.Warn("closing SPOP connection: invalid frame", "reason", reason, "error", err)
}

// Handle answers one NOTIFY frame. A message without a usable certificate is
// answered with a denial; a panic leaves the variables unset, which the
// HAProxy rules treat as a denial too.
func (s *Server) Handle(req *request.Request) {
	defer func() {
		if r := recover(); r != nil {
			s.panics.Inc()
			s.log.Error("panic while handling a message: caller denied", "panic", fmt.Sprint(r))
		}
	}()
	msg, err := req.Messages.GetByName(MessageName)
	if err != nil {
		return
	}
	target := s.cfg.Target
	if v, ok := msg.KV.Get(ArgTarget); ok {
		if t, ok := v.(string); ok && t != "" {
			target = t
		}
	}
	var der []byte
	if v, ok := msg.KV.Get(ArgCert); ok {
		der, _ = v.([]byte)
	}
	d := s.cfg.Decider.Decide(target, der)
	req.Actions.SetVar(action.ScopeSession, VarAuth, d.Allow)
	req.Actions.SetVar(action.ScopeSession, VarReason, d.Boxed.Reason)
	req.Actions.SetVar(action.ScopeSession, VarTTL, s.ttl)
	if d.Source != "" {
		req.Actions.SetVar(action.ScopeSession, VarSource, d.Boxed.Source)
		req.Actions.SetVar(action.ScopeSession, VarSPIFFE, d.Boxed.SPIFFE)
	}
}

// Listen opens a listener for an address written as host:port (TCP),
// unix:/path or /path (a unix socket; a stale socket file is replaced).
func Listen(addr string) (net.Listener, error) {
	path, isUnix := strings.CutPrefix(addr, "unix:")
	if !isUnix && strings.HasPrefix(addr, "/") {
		path, isUnix = addr, true
	}
	if !isUnix {
		return net.Listen("tcp", addr)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen unix %s: another process is serving it", path)
		}
		_ = os.Remove(path)
	}
	return net.Listen("unix", path)
}

// libLogger sends the SPOE library's messages (connection-level errors that
// are already counted elsewhere) to the debug level.
type libLogger struct{ log hclog.Logger }

func (l libLogger) Errorf(format string, args ...any) {
	l.log.Debug("spoe: " + fmt.Sprintf(format, args...))
}
