// Package spoa is haconnect's SPOE agent: HAProxy sends it the client
// certificate of each inbound mTLS connection (message "haconnect-authz",
// args cert=ssl_c_der and optionally target=<destination> and
// protocol=<the listener's mode, http or tcp>), and it answers
// with session variables HAProxy's rules act on:
//
//	<prefix>.auth    bool    the caller may proceed
//	<prefix>.source  string  the caller's service name
//	<prefix>.spiffe  string  the caller's SPIFFE ID
//	<prefix>.destination string  the destination the decision is for (-target,
//	                         or the message's target when the agent has none)
//	<prefix>.reason  string  why (see authz.Reason)
//	<prefix>.ttl_ms  int     how long HAProxy may reuse the answer on this connection
//	<prefix>.l7      int     0: the answer is final; 1: send each request's method
//	                         and path (message "haconnect-l7"); 2: its headers too
//	                         (message "haconnect-l7-headers")
//
// The per-request messages carry cert, target, method, path (pathq) and, for
// the second, headers (req.hdrs_bin); they are answered with transaction
// variables:
//
//	<prefix>.l7_auth    bool    the request may proceed
//	<prefix>.l7_reason  string  why (see authz.Reason)
//
// The wire protocol is spoken by github.com/negasus/haproxy-spoe-go behind
// spop.Guard, which keeps malformed input away from it.
package spoa

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/negasus/haproxy-spoe-go/action"
	spoe "github.com/negasus/haproxy-spoe-go/agent"
	"github.com/negasus/haproxy-spoe-go/message"
	"github.com/negasus/haproxy-spoe-go/request"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
)

// The SPOE contract; see the README's "SPOA standalone" section.
const (
	MessageName          = "haconnect-authz"
	MessageL7            = "haconnect-l7"
	MessageL7WithHeaders = "haconnect-l7-headers"
	ArgCert              = "cert"
	ArgTarget            = "target"
	ArgProtocol          = "protocol"
	ArgMethod            = "method"
	ArgPath              = "path"
	ArgHeaders           = "headers"

	VarAuth     = "auth"
	VarSource   = "source"
	VarSPIFFE   = "spiffe"
	VarDest     = "destination"
	VarReason   = "reason"
	VarTTL      = "ttl_ms"
	VarL7       = "l7"
	VarL7Set    = "l7set"
	VarL7Auth   = "l7_auth"
	VarL7Reason = "l7_reason"
)

// boxedModes holds the l7 values HAProxy receives, converted to `any`
// once: boxing allocates. 0: the decision is final; 1: each request's
// method and path go to the SPOA; 2: its headers too; 3 and 4: HAProxy
// matches each request against the set named in l7set (Config.NativeL7),
// and a request no permission matches is denied (3) or allowed (4).
var boxedModes = [5]any{0, 1, 2, 3, 4}

const (
	modeNativeDefaultDeny  = 3
	modeNativeDefaultAllow = 4
)

// Decider makes authorization decisions; *authz.Authorizer is the real one.
type Decider interface {
	Decide(destination string, der []byte) *authz.Decision
}

// Config configures a Server.
type Config struct {
	Decider Decider
	// Destination, when set, is the only destination this agent authorizes for:
	// a message without a target arg is decided for it, and a message
	// naming another destination is denied (target_mismatch). An agent
	// that serves one service's listeners is then never the authorizer of
	// another destination, whatever its SPOE messages say, and nobody can
	// make it watch destinations it was not started for. Empty: each
	// message names its destination (a shared agent).
	Destination string
	// TTL is sent as ttl_ms: how long HAProxy may reuse a decision on an
	// open connection before asking again (default 1s).
	TTL    time.Duration
	Logger hclog.Logger
	// Limits bound each SPOP connection; MaxConns bounds their number
	// (default DefaultMaxConns) and MaxInFlight the NOTIFY frames all of
	// them hold at once (default DefaultMaxInFlight). Together they bound
	// the agent's memory whatever its peers send; see the README.
	Limits      spop.Limits
	MaxConns    int
	MaxInFlight int
	// Registerer receives the server's metrics (nil: not registered).
	Registerer prometheus.Registerer
	// NativeL7 says that HAProxy matches the permissions it can natively
	// (the sidecar's configuration, which loads the sets into its maps):
	// a caller whose intention has such permissions is answered l7 3 or 4
	// with its set's name. Off (haconnect-spoa next to any HAProxy), the
	// SPOA decides every request of an L7 caller.
	NativeL7 bool
}

// Defaults of the bounds in Config.
const (
	DefaultMaxConns    = 128
	DefaultMaxInFlight = 256
)

// Server answers SPOE authorization messages.
type Server struct {
	cfg      Config
	log      hclog.Logger
	ttl      any // boxed once: the library takes values as `any`
	dest     any // cfg.Destination, boxed once
	budget   *spop.Budget
	listener atomic.Pointer[spop.Listener] // the one Serve uses, for the gauges
	rejected *prometheus.CounterVec
	panics   prometheus.Counter
	// mismatch counts messages naming a destination other than Target;
	// mismatchLogged is the unix second of the last log line about one.
	mismatch       prometheus.Counter
	mismatchLogged atomic.Int64
	// tcpL7 counts callers refused because their intention carries HTTP
	// permissions but the listener speaks TCP: a misconfiguration.
	tcpL7      *prometheus.CounterVec
	tcpL7Noted sync.Map // destination -> *atomic.Int64, unix seconds of the last log line
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
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	s := &Server{
		cfg:    cfg,
		log:    cfg.Logger,
		ttl:    int(cfg.TTL / time.Millisecond),
		dest:   cfg.Destination,
		budget: spop.NewBudget(cfg.MaxInFlight),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "frames_rejected_total",
			Help: "SPOP connections closed by the agent, by reason: an invalid frame, a refused TLS handshake, a hello or idle timeout, an idle connection evicted at -max-conns.",
		}, []string{"reason"}),
		mismatch: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "target_mismatch_total",
			Help: "Messages denied because they named a destination other than the agent's -target.",
		}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "handler_panics_total",
			Help: "Messages whose handling panicked (the caller was denied).",
		}),
		tcpL7: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "l7_on_tcp_listener_total",
			Help: "Connections refused because the caller's intention has HTTP permissions but the listener is TCP (a misconfiguration).",
		}, []string{"destination"}),
	}
	conns := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "haconnect", Subsystem: "spoa", Name: "connections",
		Help: "Open SPOP connections (at most -max-conns).",
	}, func() float64 {
		if l := s.listener.Load(); l != nil {
			return float64(l.Conns())
		}
		return 0
	})
	inFlight := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "haconnect", Subsystem: "spoa", Name: "frames_in_flight",
		Help: "NOTIFY frames read and not yet answered, all connections together (at most -max-in-flight).",
	}, func() float64 { return float64(s.budget.InFlight()) })
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{s.rejected, s.panics, s.tcpL7, s.mismatch, conns, inFlight} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// Serve answers SPOP connections on l until ctx is done or l fails. It
// closes l and, when ctx is done, the connections still open (HAProxy
// reconnects to whichever agent answers next).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	guarded := spop.NewListener(l, s.cfg.Limits, s.cfg.MaxConns, s.budget, s.onReject)
	s.listener.Store(guarded)
	var once sync.Once
	stop := func() { once.Do(func() { _ = guarded.Close() }) }
	// Stop serving when ctx ends; no goroutine outlives Serve otherwise.
	defer context.AfterFunc(ctx, stop)()
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
	s.log.Warn("closing SPOP connection", "reason", reason, "error", err)
}

// Listener is the guarded listener Serve uses (nil before Serve), for
// tests and gauges.
func (s *Server) Listener() *spop.Listener { return s.listener.Load() }

// Budget is the shared bound on in-flight frames.
func (s *Server) Budget() *spop.Budget { return s.budget }

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
	if msg, err := req.Messages.GetByName(MessageName); err == nil {
		s.handleConnection(req, msg)
		return
	}
	if msg, err := req.Messages.GetByName(MessageL7); err == nil {
		s.handleRequest(req, msg, false)
		return
	}
	if msg, err := req.Messages.GetByName(MessageL7WithHeaders); err == nil {
		s.handleRequest(req, msg, true)
	}
}

// handleConnection answers the connection-level check.
func (s *Server) handleConnection(req *request.Request, msg *message.Message) {
	destination, d := s.decide(msg)
	if d.L7 != nil && stringArg(msg, ArgProtocol) == "tcp" {
		d = s.l7OnTCP(destination, d)
	}
	req.Actions.SetVar(action.ScopeSession, VarAuth, d.Allow)
	req.Actions.SetVar(action.ScopeSession, VarReason, d.Boxed.Reason)
	req.Actions.SetVar(action.ScopeSession, VarTTL, s.ttl)
	s.setL7Mode(req, d)
	if d.Source != "" {
		req.Actions.SetVar(action.ScopeSession, VarSource, d.Boxed.Source)
		req.Actions.SetVar(action.ScopeSession, VarSPIFFE, d.Boxed.SPIFFE)
	}
	if d.Allow {
		dest := s.dest
		if destination != s.cfg.Destination {
			dest = destination
		}
		req.Actions.SetVar(action.ScopeSession, VarDest, dest)
	}
}

// setL7Mode tells HAProxy how to check the caller's requests.
func (s *Server) setL7Mode(req *request.Request, d *authz.Decision) {
	if s.cfg.NativeL7 {
		if id, defaultAllow := d.NativeSetID(); id != "" {
			mode := modeNativeDefaultDeny
			if defaultAllow {
				mode = modeNativeDefaultAllow
			}
			req.Actions.SetVar(action.ScopeSession, VarL7, boxedModes[mode])
			req.Actions.SetVar(action.ScopeSession, VarL7Set, id)
			return
		}
	}
	req.Actions.SetVar(action.ScopeSession, VarL7, boxedModes[d.L7Mode()])
}

// handleRequest answers the check of one HTTP request against the caller's
// L7 intention. The connection-level decision is taken again (from the
// cache), so a change of intention reaches the next request.
func (s *Server) handleRequest(req *request.Request, msg *message.Message, withHeaders bool) {
	allow, reason := s.checkRequest(msg, withHeaders)
	req.Actions.SetVar(action.ScopeTransaction, VarL7Auth, allow)
	// The shared denial for a reason carries its text already boxed.
	req.Actions.SetVar(action.ScopeTransaction, VarL7Reason, authz.Deny(reason).Boxed.Reason)
}

func (s *Server) checkRequest(msg *message.Message, withHeaders bool) (bool, authz.Reason) {
	_, d := s.decide(msg)
	r := authz.Request{Method: stringArg(msg, ArgMethod), Path: stringArg(msg, ArgPath)}
	if r.Method == "" || r.Path == "" {
		return false, authz.ReasonL7BadRequest
	}
	if withHeaders {
		v, _ := msg.KV.Get(ArgHeaders)
		block, _ := v.([]byte)
		if err := spop.HeaderBlock(block).Validate(); err != nil {
			s.log.Warn("denied: unreadable request headers", "error", err)
			return false, authz.ReasonL7BadRequest
		}
		r.Headers = spop.HeaderBlock(block)
	}
	return d.CheckRequest(&r)
}

func (s *Server) decide(msg *message.Message) (string, *authz.Decision) {
	destination := s.cfg.Destination
	if t := stringArg(msg, ArgTarget); t != "" {
		if destination != "" && t != destination {
			return t, s.destinationMismatch(t)
		}
		destination = t
	}
	var der []byte
	if v, ok := msg.KV.Get(ArgCert); ok {
		der, _ = v.([]byte)
	}
	return destination, s.cfg.Decider.Decide(destination, der)
}

// destinationMismatch denies a message naming a destination other than the
// agent's -target: a misconfigured spoe.conf, or a peer probing for
// another destination. One log line a minute at most, whatever the names:
// they come from the peer.
func (s *Server) destinationMismatch(named string) *authz.Decision {
	s.mismatch.Inc()
	now := time.Now().Unix()
	if prev := s.mismatchLogged.Load(); now-prev >= 60 && s.mismatchLogged.CompareAndSwap(prev, now) {
		if len(named) > 64 {
			named = named[:64] + "..."
		}
		s.log.Error("denied: the message names a destination this agent does not authorize for "+
			"(remove target= from spoe.conf, or run an agent without -target for several destinations)",
			"destination", s.cfg.Destination, "named", named)
	}
	return authz.Deny(authz.ReasonDestinationMismatch)
}

// l7OnTCP refuses a caller whose intention carries HTTP permissions on a
// listener that speaks TCP, where no request can be checked. Consul says the
// destination speaks HTTP (it refuses permissions otherwise), so the
// listener's own configuration disagrees with Consul: say so, at most once
// a minute per destination.
func (s *Server) l7OnTCP(destination string, d *authz.Decision) *authz.Decision {
	s.tcpL7.WithLabelValues(destination).Inc()
	v, _ := s.tcpL7Noted.LoadOrStore(destination, new(atomic.Int64))
	last, now := v.(*atomic.Int64), time.Now().Unix()
	if prev := last.Load(); now-prev >= 60 && last.CompareAndSwap(prev, now) {
		s.log.Error("misconfiguration: the caller's intention has HTTP permissions but this listener speaks TCP; "+
			"denied (set the proxy's protocol to http, or remove the permissions)",
			"destination", destination, "spiffe", d.SPIFFE)
	}
	return authz.Deny(authz.ReasonL7NotHTTP)
}

func stringArg(msg *message.Message, name string) string {
	v, _ := msg.KV.Get(name)
	str, _ := v.(string)
	return str
}

// libLogger sends the SPOE library's messages (connection-level errors that
// are already counted elsewhere) to the debug level.
type libLogger struct{ log hclog.Logger }

func (l libLogger) Errorf(format string, args ...any) {
	l.log.Debug("spoe: " + fmt.Sprintf(format, args...))
}
