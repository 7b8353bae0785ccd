// Package spoacmd is the haconnect-spoa command: flags, wiring and lifetime
// of an authorization agent with its metrics listener.
package spoacmd

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/haconnect/haconnect/internal/cli"
	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/logging"
	"github.com/haconnect/haconnect/internal/promserve"
	"github.com/haconnect/haconnect/internal/version"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/revoke"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
	"github.com/haconnect/haconnect/spoa/spop"
)

// Options are the command's settings.
type Options struct {
	Listen        string
	ListenMode    string // octal
	ListenGroup   string
	TLSCert       string
	TLSKey        string
	TLSClientCA   string
	Insecure      bool
	MaxFrameSize  int
	IdleTimeout   time.Duration
	MaxConns      int
	MaxInFlight   int
	MetricsListen string
	Target        string
	StaleWindow   time.Duration
	TTL           time.Duration
	// RevokeSocket is HAProxy's runtime API (level admin); when set, the
	// open streams of RevokeFrontend (comma-separated listeners tracking
	// them in RevokeTable: a TCP listener's connections, an HTTP
	// listener's upgraded streams) are closed when an intention revokes
	// their caller. RevokeUntracked counts the streams those listeners
	// refused because they could not track them.
	RevokeSocket    string
	RevokeFrontend  string
	RevokeTable     string
	RevokeUntracked string
	Consul          consulflags.Flags
	Log             logging.Flags
}

// Register adds the command's flags to fs.
func (o *Options) Register(fs *flag.FlagSet) {
	fs.StringVar(&o.Listen, "listen", DefaultListen, "SPOP listen address: unix:/path (a unix socket, see -listen-mode) or host:port (TCP: loopback, or -tls-* for mutual TLS, or -insecure-listen)")
	fs.StringVar(&o.ListenMode, "listen-mode", "0600", "permissions of the unix socket (octal; 0660 with -listen-group lets HAProxy's group connect)")
	fs.StringVar(&o.ListenGroup, "listen-group", "", "group of the unix socket (name or gid)")
	fs.StringVar(&o.TLSCert, "tls-cert", "", "TCP listener: the agent's certificate (PEM); with -tls-key and -tls-client-ca, HAProxy must present a certificate signed by -tls-client-ca")
	fs.StringVar(&o.TLSKey, "tls-key", "", "TCP listener: the key of -tls-cert (PEM)")
	fs.StringVar(&o.TLSClientCA, "tls-client-ca", "", "TCP listener: the CAs whose certificates HAProxy may present (PEM)")
	fs.BoolVar(&o.Insecure, "insecure-listen", false, "allow a TCP listener on an address other than loopback without TLS: whoever reaches it can ask for decisions, and answer in the agent's place while it is down")
	fs.IntVar(&o.MaxFrameSize, "max-frame-size", spop.DefaultMaxFrameSize, "largest SPOP frame accepted, and the max-frame-size answered to HAProxy (HAProxy then fails a larger message alone, not the connection)")
	fs.DurationVar(&o.IdleTimeout, "idle-timeout", spop.DefaultIdleTimeout, "close a SPOP connection that sends no complete frame for this long (keep it above spoe.conf's timeout idle)")
	fs.IntVar(&o.MaxConns, "max-conns", spoa.DefaultMaxConns, "SPOP connections served at once (more wait to be accepted)")
	fs.IntVar(&o.MaxInFlight, "max-in-flight", spoa.DefaultMaxInFlight, "NOTIFY frames being answered at once, all connections together (more wait to be read)")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "serve Prometheus /metrics on this host:port (off when empty)")
	fs.StringVar(&o.Target, "target", "", "the one destination service this agent authorizes: a message naming another is denied (target_mismatch); without it, each message names its destination")
	fs.DurationVar(&o.StaleWindow, "stale-window", 5*time.Minute, "how long cached decisions are served while Consul is unreachable")
	fs.DurationVar(&o.TTL, "ttl", time.Second, "how long HAProxy may reuse a decision on an open connection (sent as ttl_ms)")
	fs.StringVar(&o.RevokeSocket, "revoke-socket", "", "HAProxy's master CLI socket (haproxy -S; reaches old workers after a reload) or a stats socket (level admin): close the open streams (TCP connections, upgraded HTTP streams) of callers an intention change denies (needs -target)")
	fs.StringVar(&o.RevokeFrontend, "revoke-frontend", "inbound,inbound_tcp", "with -revoke-socket: the frontends whose tracked streams may be closed, comma-separated")
	fs.StringVar(&o.RevokeTable, "revoke-table", "haconnect_conns", "with -revoke-socket: the stick table tracking those frontends' streams by caller")
	fs.StringVar(&o.RevokeUntracked, "revoke-untracked-table", "haconnect_untracked", "with -revoke-socket: the stick table counting the streams refused because they could not be tracked, reported as haconnect_untracked_connections_total (empty: not reported)")
	o.Consul.Register(fs)
	o.Log.Register(fs)
}

// DefaultListen is the SPOP socket unless -listen says otherwise.
const DefaultListen = "unix:/run/haconnect/spoa.sock"

// listenConfig checks the listener flags and turns them into a
// spoa.ListenConfig.
func (o *Options) listenConfig() (spoa.ListenConfig, error) {
	mode, err := strconv.ParseUint(o.ListenMode, 8, 32)
	if err != nil || mode == 0 || mode&^0o777 != 0 {
		return spoa.ListenConfig{}, fmt.Errorf("-listen-mode %q: want octal permissions such as 0600 or 0660", o.ListenMode)
	}
	lc := spoa.ListenConfig{Mode: os.FileMode(mode), Group: o.ListenGroup, Insecure: o.Insecure}
	switch n := countSet(o.TLSCert, o.TLSKey, o.TLSClientCA); {
	case n == 3:
		if lc.TLS, err = spoa.ServerTLS(o.TLSCert, o.TLSKey, o.TLSClientCA); err != nil {
			return lc, fmt.Errorf("-tls-cert/-tls-key/-tls-client-ca: %w", err)
		}
	case n > 0:
		return lc, fmt.Errorf("-tls-cert, -tls-key and -tls-client-ca go together: the agent presents its certificate and requires HAProxy's")
	}
	return lc, nil
}

func countSet(values ...string) int {
	n := 0
	for _, v := range values {
		if v != "" {
			n++
		}
	}
	return n
}

// Run parses args, serves until ctx is done and returns the exit code.
func Run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("haconnect-spoa", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	o.Register(fs)
	showVersion := fs.Bool("version", false, "print the version, the commit and what it was built for, and exit")
	if code, done := cli.Parse(fs, args, stderr); done {
		return code
	}
	if *showVersion {
		version.Print(os.Stdout, "haconnect-spoa")
		return 0
	}
	if err := Serve(ctx, o, stderr); err != nil {
		return cli.Fail(stderr, fs.Name(), err)
	}
	return 0
}

// Serve runs an agent with options o until ctx is done.
func Serve(ctx context.Context, o Options, logOut io.Writer) error {
	if o.StaleWindow < 0 {
		return fmt.Errorf("-stale-window must not be negative")
	}
	if err := spoa.CheckTTL(o.TTL); err != nil {
		return err
	}
	if o.RevokeSocket != "" && o.Target == "" {
		return fmt.Errorf("-revoke-socket needs -target: connections are re-decided for that destination")
	}
	if o.MaxFrameSize < spop.MinFrameSize || o.MaxFrameSize > spop.HardMaxFrameSize {
		return fmt.Errorf("-max-frame-size must be in [%d, %d], got %d", spop.MinFrameSize, spop.HardMaxFrameSize, o.MaxFrameSize)
	}
	if o.IdleTimeout <= 0 {
		return fmt.Errorf("-idle-timeout must be positive, got %s", o.IdleTimeout)
	}
	if o.MaxConns < 1 || o.MaxInFlight < 1 {
		return fmt.Errorf("-max-conns and -max-in-flight must be at least 1")
	}
	lc, err := o.listenConfig()
	if err != nil {
		return err
	}
	log, err := o.Log.New("haconnect-spoa", logOut)
	if err != nil {
		return err
	}
	consulCfg, err := o.Consul.Config()
	if err != nil {
		return err
	}
	reg := promserve.NewRegistry()

	agentCfg := spoa.AgentConfig{
		Authz: authz.Config{
			Consul:      consulCfg,
			Logger:      log.Named("authz"),
			Metrics:     authz.NewMetrics(reg),
			StaleWindow: o.StaleWindow,
		},
		Server: &spoa.Config{
			Destination: o.Target,
			TTL:         o.TTL,
			Logger:      log,
			Registerer:  reg,
			Limits:      spop.Limits{MaxFrameSize: o.MaxFrameSize, IdleTimeout: o.IdleTimeout},
			MaxConns:    o.MaxConns,
			MaxInFlight: o.MaxInFlight,
		},
	}
	if o.Target != "" {
		agentCfg.Destinations = []string{o.Target}
	}
	var revokeAdmin *haproxy.Admin
	if o.RevokeSocket != "" {
		revokeAdmin = haproxy.NewAdmin(o.RevokeSocket)
		agentCfg.Revoke = &revoke.Config{
			Runtime: revokeAdmin, Destination: o.Target,
			Table: o.RevokeTable, Frontends: strings.Split(o.RevokeFrontend, ","), Untracked: o.RevokeUntracked,
			Logger: log.Named("revoke"), Registerer: reg,
		}
	}
	agent, err := spoa.NewAgent(agentCfg)
	if err != nil {
		return err
	}
	l, err := lc.Listen(o.Listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	var ms *promserve.Server
	if o.MetricsListen != "" {
		if ms, err = promserve.Listen(o.MetricsListen); err != nil {
			l.Close()
			return fmt.Errorf("-metrics-listen: %w", err)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	agent.Start(ctx)
	if revokeAdmin != nil {
		// The revoker keeps quiet while HAProxy has not started; say once
		// that it does not answer, in case the path is wrong. In the
		// background: a hung HAProxy must not delay serving SPOP.
		go func() {
			if err := revokeAdmin.Reachable(); err != nil {
				log.Warn("-revoke-socket does not answer (yet): open TCP connections are re-checked once HAProxy listens there",
					"socket", o.RevokeSocket, "error", err)
			}
		}()
	}
	if ms != nil {
		ms.Serve(reg)
		defer ms.Close()
		log.Info("serving metrics", "addr", ms.Addr())
	}
	log.Info("serving SPOP", "addr", l.Addr().String(), "tls", lc.TLS != nil, "target", o.Target,
		"consul", consulCfg.Address, "stale_window", o.StaleWindow, "ttl", o.TTL)
	err = agent.Serve(ctx, l)
	log.Info("stopped")
	return err
}
