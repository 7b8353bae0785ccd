// Package sidecarcmd holds the flags and lifetime shared by the commands
// that run a sidecar: `haconnect sidecar` and `haconnect nomad-hook`.
package sidecarcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/haconnect/haconnect/internal/cli"
	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/logging"
	"github.com/haconnect/haconnect/internal/promserve"
	"github.com/haconnect/haconnect/plugin/sidecar"
	"github.com/haconnect/haconnect/spoa"
)

// Options are the flags of a sidecar-running command.
type Options struct {
	Sidecar       sidecar.Config
	Consul        consulflags.Flags
	Log           logging.Flags
	MetricsListen string
	// SPOATLS collects the -spoa-tls-* flags; Prepare hands them to the
	// sidecar when any is set.
	SPOATLS sidecar.SPOAClientTLS
}

// Register adds the sidecar flags to fs; withProxy adds -sidecar-for and
// -proxy-id (nomad-hook finds the proxy itself).
func (o *Options) Register(fs *flag.FlagSet, withProxy bool) {
	c := &o.Sidecar
	if withProxy {
		fs.StringVar(&c.SidecarFor, "sidecar-for", "", "service ID whose Connect proxy to run (as `consul connect proxy -sidecar-for`)")
		fs.StringVar(&c.ProxyID, "proxy-id", "", "the proxy's own service ID (instead of -sidecar-for)")
	}
	fs.StringVar(&c.Dir, "dir", "", "working directory for the HAProxy configuration, certificates and sockets (default: a new directory under $TMPDIR)")
	fs.StringVar(&c.HAProxyBinary, "haproxy", "", "haproxy executable for the exec launcher (default: haproxy on PATH or /usr/sbin/haproxy)")
	fs.StringVar(&c.SPOAAddr, "spoa-addr", "", "external authorization agent (host:port or unix:/path); default: run one in this process")
	fs.StringVar(&o.SPOATLS.CertFile, "spoa-tls-cert", "", "with a host:port -spoa-addr: HAProxy's client certificate for the agent's mutual TLS (PEM; with -spoa-tls-key and -spoa-tls-ca)")
	fs.StringVar(&o.SPOATLS.KeyFile, "spoa-tls-key", "", "the key of -spoa-tls-cert (PEM)")
	fs.StringVar(&o.SPOATLS.CAFile, "spoa-tls-ca", "", "the CA the agent's certificate must chain to (PEM)")
	fs.StringVar(&o.SPOATLS.ServerName, "spoa-tls-server-name", "", "the name the agent's certificate must carry (default: not checked)")
	fs.StringVar(&c.AdminBind, "admin-bind", "", "serve telemetry and HAProxy's Prometheus exporter (/metrics) and stats (/stats) on this host:port")
	fs.IntVar(&c.Threads, "threads", 0, "HAProxy threads (nbthread); 0: one per CPU")
	fs.BoolVar(&c.AccessLog, "access-log", false, "log every request or connection (HAProxy's httplog/tcplog) to stderr")
	fs.DurationVar(&c.StaleWindow, "stale-window", 5*time.Minute, "embedded SPOA: serve cached decisions this long while Consul is unreachable")
	fs.DurationVar(&c.TTL, "ttl", time.Second, "embedded SPOA: how long HAProxy reuses a decision on an open connection")
	fs.BoolVar(&c.SPOAOnlyL7, "spoa-only-l7", false, "embedded SPOA: send every request of a caller whose intention has HTTP permissions to the SPOA; by default HAProxy matches the permissions that test only methods and exact or prefix paths itself (an HTTP/1.1 listener with -admin-bind)")
	fs.DurationVar(&c.StopGrace, "stop-grace", 10*time.Second, "on shutdown, how long HAProxy may take to finish its connections")
	fs.StringVar(&c.DNSServer, "dns-server", "", "resolve the host names of upstream instances and of the local app through this DNS server (host:port, e.g. Consul's DNS on 127.0.0.1:8600) instead of /etc/resolv.conf's nameservers; /etc/hosts is read first either way")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "serve haconnect's own Prometheus /metrics (sidecar and SPOA) on this host:port")
	o.Consul.Register(fs)
	o.Log.Register(fs)
}

// Prepared is a sidecar ready to run, with what must be released after.
type Prepared struct {
	Config  sidecar.Config
	Log     hclog.Logger
	cleanup []func()
}

// Close releases what Prepare set up.
func (p *Prepared) Close() {
	for i := len(p.cleanup) - 1; i >= 0; i-- {
		p.cleanup[i]()
	}
}

// Prepare checks the options and builds the logger, Consul client
// configuration, working directory and metrics listener.
func (o *Options) Prepare(name string, stderr io.Writer) (*Prepared, error) {
	c := o.Sidecar
	if err := spoa.CheckTTL(c.TTL); err != nil {
		return nil, err
	}
	if c.StaleWindow < 0 {
		return nil, errors.New("-stale-window must not be negative")
	}
	if t := o.SPOATLS; t != (sidecar.SPOAClientTLS{}) {
		switch {
		case t.CertFile == "" || t.KeyFile == "" || t.CAFile == "":
			return nil, errors.New("-spoa-tls-cert, -spoa-tls-key and -spoa-tls-ca go together")
		case c.SPOAAddr == "" || strings.HasPrefix(c.SPOAAddr, "unix:"):
			return nil, errors.New("-spoa-tls-* need a host:port -spoa-addr")
		}
		c.SPOATLS = &t
	}
	log, err := o.Log.New(name, stderr)
	if err != nil {
		return nil, err
	}
	if c.Consul, err = o.Consul.Config(); err != nil {
		return nil, err
	}
	if o.Consul.TokenOrigin != "" {
		log.Info("Consul ACL token", "from", o.Consul.TokenOrigin)
	}
	p := &Prepared{Log: log}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "haconnect-sidecar-"); err != nil {
			return nil, err
		}
		dir := c.Dir
		p.cleanup = append(p.cleanup, func() { os.RemoveAll(dir) })
	} // sidecar.New makes a relative -dir absolute
	reg := promserve.NewRegistry()
	c.Logger, c.Registerer = log, reg
	// The process's metrics also reach the admin listener's /metrics
	// through a loopback listener of its own, so that one scrape target
	// (-admin-bind, or envoy_prometheus_bind_addr) has everything.
	internal, err := promserve.Listen("127.0.0.1:0")
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("metrics for the admin listener: %w", err)
	}
	internal.Serve(reg)
	p.cleanup = append(p.cleanup, func() { internal.Close() })
	c.ProcessMetricsURL = "http://" + internal.Addr() + "/metrics"
	if o.MetricsListen != "" {
		ms, err := promserve.Listen(o.MetricsListen)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("-metrics-listen: %w", err)
		}
		ms.Serve(reg)
		p.cleanup = append(p.cleanup, func() { ms.Close() })
	}
	p.Config = c
	return p, nil
}

// Run parses the `haconnect sidecar` command line, runs the sidecar until
// ctx is done and returns the exit code.
func Run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("haconnect sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	o.Register(fs, true)
	if code, done := cli.Parse(fs, args, stderr); done {
		return code
	}
	if (o.Sidecar.ProxyID == "") == (o.Sidecar.SidecarFor == "") {
		return cli.Fail(stderr, "haconnect sidecar", errors.New("give exactly one of -sidecar-for and -proxy-id"))
	}
	p, err := o.Prepare("haconnect-sidecar", stderr)
	if err != nil {
		return cli.Fail(stderr, "haconnect sidecar", err)
	}
	defer p.Close()
	return Serve(ctx, p, stderr, "haconnect sidecar")
}

// Serve runs a prepared sidecar until ctx is done.
func Serve(ctx context.Context, p *Prepared, stderr io.Writer, name string) int {
	sc, err := sidecar.New(p.Config)
	if err != nil {
		return cli.Fail(stderr, name, err)
	}
	if err := sc.Run(ctx); err != nil {
		return cli.Fail(stderr, name, err)
	}
	p.Log.Info("stopped")
	return 0
}
