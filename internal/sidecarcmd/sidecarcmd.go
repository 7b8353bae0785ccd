// Package sidecarcmd is the `haconnect sidecar` command.
package sidecarcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/logging"
	"github.com/haconnect/haconnect/plugin/sidecar"
)

// Run parses args, runs the sidecar until ctx is done and returns the exit
// code.
func Run(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("haconnect sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfg           sidecar.Config
		consul        consulflags.Flags
		logFlags      logging.Flags
		metricsListen string
	)
	fs.StringVar(&cfg.SidecarFor, "sidecar-for", "", "service ID whose Connect proxy to run (as `consul connect proxy -sidecar-for`)")
	fs.StringVar(&cfg.ProxyID, "proxy-id", "", "the proxy's own service ID (instead of -sidecar-for)")
	fs.StringVar(&cfg.Dir, "dir", "", "working directory for the HAProxy configuration, certificates and sockets (default: a new directory under $TMPDIR)")
	fs.StringVar(&cfg.HAProxyBinary, "haproxy", "", "haproxy executable (default: haproxy on PATH or /usr/sbin/haproxy)")
	fs.StringVar(&cfg.SPOAAddr, "spoa-addr", "", "external authorization agent (host:port or unix:/path); default: run one in this process")
	fs.StringVar(&cfg.AdminBind, "admin-bind", "", "serve HAProxy's Prometheus exporter (/metrics) and stats (/stats) on this host:port")
	fs.IntVar(&cfg.Threads, "threads", 0, "HAProxy threads (nbthread); 0: one per CPU")
	fs.BoolVar(&cfg.AccessLog, "access-log", false, "log every request or connection (HAProxy's httplog/tcplog) to stderr")
	fs.StringVar(&metricsListen, "metrics-listen", "", "serve haconnect's own Prometheus /metrics (sidecar and SPOA) on this host:port")
	fs.DurationVar(&cfg.StaleWindow, "stale-window", 5*time.Minute, "embedded SPOA: serve cached decisions this long while Consul is unreachable")
	fs.DurationVar(&cfg.TTL, "ttl", time.Second, "embedded SPOA: how long HAProxy reuses a decision on an open connection")
	fs.DurationVar(&cfg.StopGrace, "stop-grace", 10*time.Second, "on shutdown, how long HAProxy may take to finish its connections")
	consul.Register(fs)
	logFlags.Register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "haconnect sidecar: %v\n", err)
		return 1
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "haconnect sidecar: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if (cfg.ProxyID == "") == (cfg.SidecarFor == "") {
		return fail(errors.New("give exactly one of -sidecar-for and -proxy-id"))
	}
	if cfg.TTL <= 0 || cfg.StaleWindow < 0 {
		return fail(errors.New("-ttl must be positive and -stale-window not negative"))
	}
	log, err := logFlags.New("haconnect-sidecar", stderr)
	if err != nil {
		return fail(err)
	}
	if cfg.Consul, err = consul.Config(); err != nil {
		return fail(err)
	}
	if cfg.Dir == "" {
		if cfg.Dir, err = os.MkdirTemp("", "haconnect-sidecar-"); err != nil {
			return fail(err)
		}
		defer os.RemoveAll(cfg.Dir)
	} else if cfg.Dir, err = filepath.Abs(cfg.Dir); err != nil {
		return fail(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg.Logger, cfg.Registerer = log, reg
	sc, err := sidecar.New(cfg)
	if err != nil {
		return fail(err)
	}
	if metricsListen != "" {
		l, err := net.Listen("tcp", metricsListen)
		if err != nil {
			return fail(fmt.Errorf("-metrics-listen: %w", err))
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = hs.Serve(l) }()
		defer hs.Close()
	}
	if err := sc.Run(ctx); err != nil {
		return fail(err)
	}
	log.Info("stopped")
	return 0
}
