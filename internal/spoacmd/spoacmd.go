// Package spoacmd is the haconnect-spoa command: flags, wiring and lifetime
// of an authorization agent with its metrics listener.
package spoacmd

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/haconnect/haconnect/internal/cli"
	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/logging"
	"github.com/haconnect/haconnect/internal/promserve"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/revoke"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
)

// Options are the command's settings.
type Options struct {
	Listen        string
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
	Consul         consulflags.Flags
	Log            logging.Flags
}

// Register adds the command's flags to fs.
func (o *Options) Register(fs *flag.FlagSet) {
	fs.StringVar(&o.Listen, "listen", "127.0.0.1:12345", "SPOP listen address: host:port, or unix:/path for a unix socket")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "serve Prometheus /metrics on this host:port (off when empty)")
	fs.StringVar(&o.Target, "target", "", "destination service checked when a message has no target argument")
	fs.DurationVar(&o.StaleWindow, "stale-window", 5*time.Minute, "how long cached decisions are served while Consul is unreachable")
	fs.DurationVar(&o.TTL, "ttl", time.Second, "how long HAProxy may reuse a decision on an open connection (sent as ttl_ms)")
	fs.StringVar(&o.RevokeSocket, "revoke-socket", "", "HAProxy's master CLI socket (haproxy -S; reaches old workers after a reload) or a stats socket (level admin): close the open streams (TCP connections, upgraded HTTP streams) of callers an intention change denies (needs -target)")
	fs.StringVar(&o.RevokeFrontend, "revoke-frontend", "inbound,inbound_tcp", "with -revoke-socket: the frontends whose tracked streams may be closed, comma-separated")
	fs.StringVar(&o.RevokeTable, "revoke-table", "haconnect_conns", "with -revoke-socket: the stick table tracking those frontends' streams by caller")
	fs.StringVar(&o.RevokeUntracked, "revoke-untracked-table", "haconnect_untracked", "with -revoke-socket: the stick table counting the streams refused because they could not be tracked, reported as haconnect_untracked_connections_total (empty: not reported)")
	o.Consul.Register(fs)
	o.Log.Register(fs)
}

// Run parses args, serves until ctx is done and returns the exit code.
func Run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("haconnect-spoa", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	o.Register(fs)
	if code, done := cli.Parse(fs, args, stderr); done {
		return code
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
	if o.TTL <= 0 || o.TTL > time.Hour {
		return fmt.Errorf("-ttl must be in (0, 1h], got %s", o.TTL)
	}
	if o.RevokeSocket != "" && o.Target == "" {
		return fmt.Errorf("-revoke-socket needs -target: connections are re-decided for that destination")
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

	azCfg := authz.Config{
		Consul:      consulCfg,
		Logger:      log.Named("authz"),
		Metrics:     authz.NewMetrics(reg),
		StaleWindow: o.StaleWindow,
	}
	var rev *revoke.Revoker
	var revokeAdmin *haproxy.Admin
	if o.RevokeSocket != "" {
		revokeAdmin = haproxy.NewAdmin(o.RevokeSocket)
		rev, err = revoke.New(revoke.Config{
			Runtime: revokeAdmin, Target: o.Target,
			Table: o.RevokeTable, Frontends: strings.Split(o.RevokeFrontend, ","), Untracked: o.RevokeUntracked,
			Logger: log.Named("revoke"), Registerer: reg,
		})
		if err != nil {
			return err
		}
		azCfg.OnChange = rev.Changed
	}
	az, err := authz.New(azCfg)
	if err != nil {
		return err
	}
	srv, err := spoa.NewServer(spoa.Config{
		Decider:    az,
		Target:     o.Target,
		TTL:        o.TTL,
		Logger:     log,
		Registerer: reg,
	})
	if err != nil {
		return err
	}
	l, err := spoa.Listen(o.Listen)
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
	var targets []string
	if o.Target != "" {
		targets = append(targets, o.Target)
	}
	az.Start(ctx, targets...)
	if rev != nil {
		go rev.Run(ctx, az)
		// The revoker keeps quiet while HAProxy has not started; say once
		// that it does not answer, in case the path is wrong. In the
		// background: a hung HAProxy must not delay serving SPOP.
		go func() {
			if _, err := revokeAdmin.Command("help"); err != nil {
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
	log.Info("serving SPOP", "addr", l.Addr().String(), "target", o.Target,
		"consul", consulCfg.Address, "stale_window", o.StaleWindow, "ttl", o.TTL)
	err = srv.Serve(ctx, l)
	log.Info("stopped")
	return err
}
