// Package sidecar turns a Consul Connect proxy registration into a running
// HAProxy and keeps it current: the registration, the leaf certificate, the
// CA roots and the healthy instances of every upstream are watched with
// blocking queries; each change renders a complete configuration
// (plugin/render) and applies it through the runtime API when it can, or a
// hitless reload when it must (plugin/haproxy). Inbound callers are
// authorized by the SPOA, embedded here unless an external one is named.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/internal/dnsresolve"
	"github.com/haconnect/haconnect/internal/meshid"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
	"github.com/haconnect/haconnect/plugin/revoke"
	"github.com/haconnect/haconnect/spoa"
	"github.com/haconnect/haconnect/spoa/authz"
)

// Config configures a sidecar.
type Config struct {
	Consul *api.Config
	// ProxyID is the proxy's service ID; or SidecarFor names the service
	// ID whose proxy this is (as `consul connect proxy -sidecar-for`).
	ProxyID    string
	SidecarFor string
	// Dir holds the configuration, certificates and sockets (created 0700).
	Dir           string
	HAProxyBinary string
	// SPOAAddr is an external authorization agent (host:port or
	// unix:/path); empty runs one inside this process.
	SPOAAddr string
	// SPOATLS reaches a TCP SPOAAddr with mutual TLS (nil: plain).
	SPOATLS *SPOAClientTLS
	// AdminBind serves HAProxy's Prometheus exporter (/metrics) and stats
	// page (/stats); empty: off.
	AdminBind string
	// ProcessMetricsURL is this process's own /metrics, which the admin
	// listener appends to its own (one scrape target); empty: not served.
	// It must be reachable from HAProxy's network namespace.
	ProcessMetricsURL string
	// Threads is HAProxy's nbthread (0: one per CPU); AccessLog logs every
	// request.
	Threads     int
	AccessLog   bool
	StaleWindow time.Duration // embedded SPOA (default 5m)
	TTL         time.Duration // embedded SPOA's ttl_ms (default 1s)
	// SPOAOnlyL7 turns native L7 matching off: every request of a caller
	// whose intention has HTTP permissions is sent to the SPOA. On (the
	// default, with the embedded SPOA, an HTTP/1.1 listener and
	// AdminBind), HAProxy matches the permissions that test only methods
	// and exact or prefix paths itself (plugin/render/l7native.go).
	SPOAOnlyL7 bool
	// StopGrace is how long HAProxy may take to finish its connections on
	// shutdown (default 10s).
	StopGrace time.Duration
	// DNSServer, if set (host:port), resolves the host names of upstream
	// instances and of the local app instead of /etc/resolv.conf's
	// nameservers (e.g. Consul's DNS on 127.0.0.1:8600); /etc/hosts is
	// read first either way.
	DNSServer string
	// Launcher runs HAProxy (default: a child process, haproxy.Exec).
	Launcher   haproxy.Launcher
	Logger     hclog.Logger
	Registerer prometheus.Registerer
}

// SPOAClientTLS is what HAProxy presents to an external authorization
// agent over TCP, and how it checks the agent's certificate.
type SPOAClientTLS struct {
	CertFile, KeyFile string // HAProxy's client certificate and key (PEM)
	CAFile            string // the CA the agent's certificate must chain to
	ServerName        string // the name the agent's certificate must carry ("": any)
}

// Sidecar is one running sidecar; create it with New and call Run.
type Sidecar struct {
	cfg     Config
	log     hclog.Logger
	client  *api.Client
	metrics *metrics

	// rootsWatch is the one watch of the CA roots, which the embedded
	// authorizer follows too.
	rootsWatch *consulwatch.Value[*api.CARootList]
	// spoaTLS is how HAProxy reaches an external SPOA over TCP, with files
	// in the working directory (set once, before the apply loop starts).
	spoaTLS *render.SPOATLS
	// resolver keeps the host names of upstream instances and of the
	// local app resolved (resolve.go); localAddrs is the local app's last
	// address by name, the apply loop's alone.
	resolver   *dnsresolve.Resolver
	localAddrs map[string]string
	// watched is what the watches fill (watched.go); applier, what
	// HAProxy runs and how it is changed, the apply loop's alone
	// (apply.go).
	watched
	applier
}

// endpoint is one healthy instance of an upstream's sidecar.
type endpoint = consulwatch.Endpoint

// New checks cfg and creates a sidecar.
func New(cfg Config) (*Sidecar, error) {
	if (cfg.ProxyID == "") == (cfg.SidecarFor == "") {
		return nil, errors.New("exactly one of -proxy-id and -sidecar-for is required")
	}
	if cfg.Dir == "" {
		return nil, errors.New("no working directory")
	}
	if cfg.Consul == nil {
		cfg.Consul = api.DefaultConfig()
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = 10 * time.Second
	}
	if cfg.Launcher == nil {
		bin, err := haproxy.BinaryPath(cfg.HAProxyBinary)
		if err != nil {
			return nil, err
		}
		cfg.HAProxyBinary = bin
		cfg.Launcher = haproxy.Exec{}
	}
	// consulwatch's client keeps the raw answer of a discovery chain query.
	client, err := consulwatch.NewClient(cfg.Consul)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	abs, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	cfg.Dir = abs
	m := newMetrics(cfg.Registerer)
	lookup := dnsresolve.Lookuper(net.DefaultResolver)
	if cfg.DNSServer != "" {
		r, err := dnsresolve.NetResolver(cfg.DNSServer)
		if err != nil {
			return nil, fmt.Errorf("DNS server %q: %w", cfg.DNSServer, err)
		}
		lookup = r
	}
	s := &Sidecar{
		cfg:        cfg,
		log:        cfg.Logger,
		client:     client,
		metrics:    m,
		rootsWatch: consulwatch.NewValue[*api.CARootList](),
		watched:    newWatched(),
		applier: applier{launcher: cfg.Launcher, log: cfg.Logger, metrics: m,
			haproxy: haproxy.Config{Binary: cfg.HAProxyBinary, Dir: cfg.Dir, Logger: cfg.Logger}},
		localAddrs: map[string]string{},
	}
	// A changed answer wakes the apply loop like a Consul change does.
	s.resolver = dnsresolve.New(dnsresolve.Config{Lookuper: lookup, Logger: cfg.Logger.Named("dns"),
		OnChange: func() { s.update(func() {}) }, Registerer: cfg.Registerer})
	return s, nil
}

// setL7Sets records the destination's native L7 sets, and wakes the apply
// loop when they changed.
func (s *Sidecar) setL7Sets(sets []*authz.NativeSet) {
	s.mu.Lock()
	same := render.SameL7Sets(s.l7Sets, sets)
	s.mu.Unlock()
	if !same {
		s.update(func() { s.l7Sets = sets })
	}
}

// nativeL7 says whether HAProxy matches native L7 sets: the embedded SPOA
// answers them, unless -spoa-only-l7.
func (s *Sidecar) nativeL7() bool { return s.cfg.SPOAAddr == "" && !s.cfg.SPOAOnlyL7 }

func (s *Sidecar) path(name string) string { return filepath.Join(s.cfg.Dir, name) }

// Run serves until ctx is done, then stops HAProxy gracefully. It returns
// nil after a requested stop.
func (s *Sidecar) Run(ctx context.Context) error {
	if err := os.MkdirAll(s.cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("working directory: %w", err)
	}
	proxyID, err := s.resolveProxyID(ctx)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runCtx := ctx // upstream watches live as long as the sidecar

	go s.resolver.Run(ctx)
	refusals := newRefusalLog(s.log, proxyID) // unsupported settings, each logged once
	go consulwatch.Run(ctx, s.client, consulwatch.ProxyRegistration{ProxyID: proxyID}, s.hooks(consulwatch.ProxyRegistration{ProxyID: proxyID}),
		func(svc *api.AgentService) {
			reg, rerr := refusals.read(svc)
			s.update(func() {
				s.reg, s.regErr = reg, rerr
				if reg != nil {
					s.syncUpstreamWatchesLocked(runCtx, reg)
					s.syncExposedChecksWatchLocked(runCtx, reg)
				}
			})
			if rerr != nil {
				s.log.Error("proxy registration rejected: keeping the running configuration", "proxy_id", proxyID, "error", rerr)
				s.metrics.configErrors.Inc()
			}
		})
	// One watch of the CA roots serves HAProxy's ca-file and the
	// authorizer's trust domain and chain checks.
	go s.rootsWatch.Watch(ctx, s.client, consulwatch.Roots{}, s.hooks(consulwatch.Roots{}))
	s.rootsWatch.Subscribe(func(roots *api.CARootList) { s.update(func() { s.roots = roots }) })

	// The leaf and the SPOA need the destination service's name, which the
	// registration gives.
	service, err := s.waitService(ctx)
	if err != nil {
		return nil // stopped while waiting
	}
	leafQuery := consulwatch.Leaf{Service: service}
	go consulwatch.Run(ctx, s.client, leafQuery, s.hooks(leafQuery), func(leaf *api.LeafCert) {
		s.update(func() { s.leaf = leaf })
	})

	spoaAddr, stopSPOA, err := s.startSPOA(ctx, service)
	if err != nil {
		return err
	}
	defer stopSPOA()

	err = s.applyLoop(ctx, spoaAddr)
	if s.proc != nil {
		s.log.Info("stopping haproxy", "grace", s.cfg.StopGrace)
		s.proc.Stop(s.cfg.StopGrace)
	}
	return err
}

// resolveProxyID finds the proxy for -sidecar-for, retrying until Consul
// answers and the proxy is registered.
func (s *Sidecar) resolveProxyID(ctx context.Context) (string, error) {
	if s.cfg.ProxyID != "" {
		return s.cfg.ProxyID, nil
	}
	retry := newBackoff()
	for {
		services, err := s.client.Agent().ServicesWithFilterOpts(
			fmt.Sprintf("Kind == %q and Proxy.DestinationServiceID == %q", api.ServiceKindConnectProxy, s.cfg.SidecarFor),
			(&api.QueryOptions{}).WithContext(ctx))
		switch {
		case ctx.Err() != nil:
			return "", ctx.Err()
		case err != nil:
			s.log.Warn("cannot list the agent's services: retrying", "error", err, "retry_in", retry.Next())
		case len(services) == 1:
			for id := range services {
				s.log.Info("found the proxy", "sidecar_for", s.cfg.SidecarFor, "proxy_id", id)
				return id, nil
			}
		case len(services) > 1:
			ids := make([]string, 0, len(services))
			for id := range services {
				ids = append(ids, id)
			}
			sort.Strings(ids)
			return "", fmt.Errorf("service %q has %d sidecar proxies (%s): name one with -proxy-id",
				s.cfg.SidecarFor, len(ids), strings.Join(ids, ", "))
		default:
			s.log.Warn("no proxy registered for the service yet (or the ACL token lacks service:read on the proxy's name, e.g. <service>-sidecar-proxy): retrying",
				"sidecar_for", s.cfg.SidecarFor, "retry_in", retry.Next())
		}
		if !retry.Wait(ctx) {
			return "", ctx.Err()
		}
	}
}

func (s *Sidecar) waitService(ctx context.Context) (string, error) {
	for {
		s.mu.Lock()
		reg := s.reg
		s.mu.Unlock()
		if reg != nil {
			return reg.Service, nil
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// startSPOA runs the embedded authorization agent on a unix socket in the
// working directory, or returns the external one's address. Either way an
// authorizer watches the service's intentions, so that a change reaches
// the open streams it now denies (TCP connections, upgraded HTTP streams:
// plugin/revoke).
func (s *Sidecar) startSPOA(ctx context.Context, service string) (string, func(), error) {
	external := s.cfg.SPOAAddr != ""
	var reg prometheus.Registerer
	if !external {
		reg = s.cfg.Registerer // an external SPOA reports its own decisions
	}
	cfg := spoa.AgentConfig{
		Authz: authz.Config{
			Consul:      s.cfg.Consul,
			Logger:      s.log.Named("authz"),
			Metrics:     authz.NewMetrics(reg),
			StaleWindow: s.cfg.StaleWindow,
			Roots:       s.rootsWatch,
		},
		Destinations: []string{service},
		Revoke: &revoke.Config{
			Runtime: haproxy.NewAdmin(haproxy.Config{Dir: s.cfg.Dir}.MasterSocket()), Destination: service,
			Table: render.ConnTable, Frontends: []string{render.InboundFrontend}, Untracked: render.UntrackedTable,
			Logger: s.log.Named("revoke"), Registerer: s.cfg.Registerer,
		},
	}
	native := s.nativeL7()
	var authorizer atomic.Pointer[authz.Authorizer]
	if native {
		// The native L7 sets follow every change the authorizer reports
		// (intentions, protocol, Consul going stale): the apply loop loads
		// them into HAProxy's maps.
		cfg.OnChange = func(destination string) {
			if a := authorizer.Load(); a != nil && destination == service {
				s.setL7Sets(a.NativeSets(service))
			}
		}
	}
	if !external {
		cfg.Server = &spoa.Config{Destination: service, TTL: s.cfg.TTL,
			Logger: s.log.Named("spoa"), Registerer: s.cfg.Registerer, NativeL7: native}
	}
	agent, err := spoa.NewAgent(cfg)
	if err != nil {
		return "", nil, err
	}
	authorizer.Store(agent.Authorizer)
	sctx, cancel := context.WithCancel(ctx)
	agent.Start(sctx)
	var running sync.WaitGroup
	stop := func() { cancel(); agent.Wait(); running.Wait() }
	if external {
		addr := s.cfg.SPOAAddr
		if p, ok := strings.CutPrefix(addr, "unix:"); ok {
			addr = "unix@" + p
		}
		if s.cfg.SPOATLS != nil {
			if s.spoaTLS, err = s.writeSPOATLS(*s.cfg.SPOATLS); err != nil {
				stop()
				return "", nil, err
			}
		}
		return addr, stop, nil
	}
	sock := s.path("spoa.sock")
	l, err := spoa.Listen("unix:" + sock)
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("embedded SPOA: %w", err)
	}
	running.Go(func() {
		if err := agent.Serve(sctx, l); err != nil {
			s.log.Error("embedded SPOA stopped", "error", err)
		}
	})
	return "unix@" + sock, stop, nil
}

func upstreamKey(u render.Upstream) string {
	if u.Datacenter == "" {
		return u.Name
	}
	return u.Name + "@" + u.Datacenter
}

// syncUpstreamWatchesLocked starts a health watch for each new upstream and
// stops those no longer registered. An upstream whose watch fails before
// its first answer is configured with no instances (watched.snapshot)
// instead of holding back the others; its first answer fills it in.
func (s *Sidecar) syncUpstreamWatchesLocked(ctx context.Context, reg *proxyConfig) {
	want := map[string]render.Upstream{}
	for _, u := range reg.Upstreams {
		want[upstreamKey(u)] = u
	}
	for k, uw := range s.watching {
		if _, ok := want[k]; !ok {
			uw.cancel()
			delete(s.watching, k)
			delete(s.endpoints, k)
			s.stopChainWatchLocked(k)
		}
	}
	for k, u := range want {
		// Its discovery chain (chain.go), restarted if the upstream's
		// protocol or connect timeout changed.
		s.syncChainWatchLocked(ctx, k, u)
		if _, ok := s.watching[k]; ok {
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		uw := &upstreamWatch{cancel: cancel, status: consulwatch.NewStatus(), started: time.Now()}
		s.watching[k] = uw
		k := k
		query := consulwatch.UpstreamHealth{Service: u.Name, Datacenter: u.Datacenter}
		hooks := s.hooks(query)
		hooks.Status = uw.status
		logFailing := hooks.OnFailing
		hooks.OnFailing = func(err error) {
			logFailing(err)
			if _, refused := consulflags.Refused(err); refused {
				err = consulwatch.ExplainRefusal(query.Endpoint(), err)
			}
			s.update(func() { uw.err = err }) // wakes the apply loop, which stops waiting for it
		}
		go s.wakeAfter(wctx, upstreamGrace) // then an upstream that never answers is given up on
		// The gateways last logged for k (Run calls apply from one goroutine).
		gateways := ""
		go consulwatch.Run(wctx, s.client, query, hooks, func(eps []endpoint) {
			eps, gws := withoutGateways(eps)
			if gws != gateways && gws != "" {
				s.log.Error("upstream served by a terminating gateway, which routes on the TLS SNI that HAProxy 2.6 cannot send with Consul leaves (see \"upstream SNI not sent\"): the gateway is left out, so callers get 503 and TCP connections are closed",
					"upstream", k, "gateway", gws)
			}
			gateways = gws
			s.update(func() {
				if wctx.Err() == nil {
					s.endpoints[k] = eps
				}
			})
		})
	}
}

// peerURI is the SPIFFE ID an upstream's sidecar certificate carries: the
// upstream's name in this sidecar's trust domain, partition and namespace,
// in the upstream's datacenter (by default this sidecar's).
func peerURI(self meshid.Service, u render.Upstream) (string, error) {
	id, err := peerService(self, u).ID()
	if err != nil {
		return "", fmt.Errorf("upstream %q: %w", u.Name, err)
	}
	return id.String(), nil
}

// peerService is the identity of an upstream's sidecars: the upstream's
// name in this sidecar's trust domain, partition and namespace, in the
// upstream's datacenter (by default this sidecar's).
func peerService(self meshid.Service, u render.Upstream) meshid.Service {
	peer := self
	peer.Name = u.Name
	if u.Datacenter != "" {
		peer.Datacenter = u.Datacenter
	}
	return peer
}

// writeSPOATLS copies HAProxy's client certificate and key, and the CA of
// the external SPOA, into the working directory: the only directory an
// HAProxy in a container sees. They are read once, at start.
func (s *Sidecar) writeSPOATLS(c SPOAClientTLS) (*render.SPOATLS, error) {
	var pems [3][]byte
	for i, path := range []string{c.CertFile, c.KeyFile, c.CAFile} {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("SPOA TLS: %w", err)
		}
		pems[i] = b
	}
	t := &render.SPOATLS{CertFile: s.path("spoa-client.pem"), CAFile: s.path("spoa-ca.pem"), ServerName: c.ServerName}
	certKey := append(append(append([]byte{}, pems[0]...), '\n'), pems[1]...)
	if err := haproxy.WriteFileAtomic(t.CertFile, certKey, 0o600); err != nil {
		return nil, err
	}
	if err := haproxy.WriteFileAtomic(t.CAFile, pems[2], 0o600); err != nil {
		return nil, err
	}
	return t, nil
}
