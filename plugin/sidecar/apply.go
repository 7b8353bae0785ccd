package sidecar

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/haconnect/haconnect/internal/meshid"
	"github.com/haconnect/haconnect/plugin/chain"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// applyLoop applies every change until ctx is done. HAProxy is started on
// the first complete state; a HAProxy that dies is started again.
func (s *Sidecar) applyLoop(ctx context.Context, spoaAddr string) error {
	waitingLogged := ""
	startBackoff := time.Second
	sweep := time.NewTicker(outlierSweep)
	defer sweep.Stop()
	for {
		var died <-chan struct{}
		if s.proc != nil {
			died = s.proc.Done()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-died:
			s.log.Error("haproxy exited unexpectedly: starting it again", "error", s.proc.Err())
			s.metrics.restarts.Inc()
			s.proc, s.applied = nil, appliedState{}
			time.Sleep(200 * time.Millisecond)
		case <-s.changed:
			// Let a burst of changes (e.g. a rotation touching roots and
			// leaf) arrive before rendering.
			time.Sleep(2 * time.Millisecond)
		case <-sweep.C:
			s.sweepOutliers() // outlier.go; nothing to render
			continue
		}
		snap := s.snapshot()
		s.resolveNames(&snap) // host names to addresses, from DNS answers already in
		for _, u := range snap.unread {
			if u.chain {
				s.log.Warn("upstream discovery chain cannot be read: serving the upstream from its own instances, as with no service-resolver, -splitter or -router, until Consul answers",
					"upstream", u.key, "error", u.err)
				continue
			}
			s.log.Warn("upstream instances cannot be read: serving it with no instances (HTTP callers get 503, TCP connections are closed) until Consul answers",
				"upstream", u.key, "error", u.err)
		}
		if len(snap.missing) > 0 {
			if w := strings.Join(snap.missing, ", "); w != waitingLogged {
				s.log.Info("waiting for Consul before configuring HAProxy", "missing", w)
				waitingLogged = w
			}
			s.requeue(snap.pendingAt)
			continue
		}
		if snap.regErr != nil {
			continue // logged by the watch; the running configuration stays
		}
		if err := s.apply(ctx, snap, spoaAddr); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.metrics.configErrors.Inc()
			if s.proc == nil {
				// Nothing runs: try again after a while even if Consul
				// stays quiet (an engine restarting, an image missing).
				s.log.Error("haproxy could not be started: retrying", "error", err, "retry_in", startBackoff)
				s.requeue(snap.pendingAt)
				go s.wakeAfter(ctx, startBackoff)
				startBackoff = min(startBackoff*2, 10*time.Second)
				continue
			}
			s.log.Error("change not applied: HAProxy keeps its running configuration", "error", err)
			continue
		}
		startBackoff = time.Second
	}
}

// buildModel turns a complete snapshot into a render model, keeping every
// upstream instance in the slot it had in slots, and returns the model's
// own slots. It changes nothing.
func (s *Sidecar) buildModel(snap snapshot, spoaAddr string, slots map[string][]string) (*render.Model, map[string][]string) {
	reg := snap.reg
	m := &render.Model{
		Service:           reg.Service,
		LeafFile:          s.path("leaf.pem"),
		RootsFile:         s.path("roots.pem"),
		SPOEFile:          s.path("spoe.conf"),
		AdminSocket:       s.path("admin.sock"),
		SPOAAddr:          spoaAddr,
		SPOATLS:           s.spoaTLS,
		SelfURI:           snap.leaf.ServiceURI,
		ProcessMetricsURL: s.cfg.ProcessMetricsURL,
		LuaFile:           s.path("haconnect.lua"),
		PeerMapFile:       s.path("upstream_peers.map"),
		RateLimitMapFile:  s.path("rate_limits.map"),
		LatencyMapFile:    s.path("latency_buckets.map"),
		Threads:           s.cfg.Threads,
		AccessLog:         s.cfg.AccessLog || reg.AccessLogs,
		Inbound:           reg.Inbound,
		Exposed:           exposedPaths(reg, snap.exposedChecks),
	}
	if s.nativeL7() {
		m.L7MapDir, m.L7Sets = s.cfg.Dir, snap.l7Sets
	}
	// -admin-bind, or the registration's envoy_*_bind_addr (settings.go).
	m.AdminBind, m.AdminBindAlso = adminBinds(s.cfg.AdminBind, reg.MetricsBinds)
	// The upstreams' identities: this sidecar's own, from its leaf, with
	// the cluster's trust domain (from the roots) and the upstream's name.
	// One that cannot be built stays empty, which Validate refuses.
	self, selfErr := meshid.ParseString(snap.leaf.ServiceURI)
	if td, err := spiffeid.TrustDomainFromString(snap.roots.TrustDomain); err == nil {
		self.TrustDomain = td
	} else {
		selfErr = err
	}
	next := map[string][]string{}
	for _, u := range reg.Upstreams {
		k := upstreamKey(u)
		use := snap.use[k]
		eps := snap.endpoints[k]
		if use.closed {
			eps = nil // a refused chain with nothing before it: no instances
		}
		next[k] = assignSlots(slots[k], eps)
		byKey := map[string]endpoint{}
		for _, e := range snap.endpoints[k] {
			byKey[e.Key()] = e
		}
		up := u // as registered, with its peer's identity and its slots
		up.PeerURI, up.SNI = "", ""
		if selfErr == nil {
			up.PeerURI, _ = peerURI(self, u)
			up.SNI = upstreamSNI(peerService(self, u))
		}
		up.Servers = nil
		for i, inst := range next[k] {
			srv := render.Server{Name: render.ServerName(i)}
			if inst != "" {
				e := byKey[inst]
				srv.Addr, srv.Port = e.Addr, e.Port
			}
			up.Servers = append(up.Servers, srv)
		}
		if up.Limits != nil {
			limitShares(up.Limits.Concurrent, up.Servers) // settings.go
		}
		if use.plan != nil {
			// Routed by its discovery chain (chain.go): the targets'
			// backends are served, the upstream's own slots are kept
			// for when the chain goes back to the default.
			up.Servers = nil
			up.Routes, up.Targets, _ = convertPlan(use.plan)
			for i := range up.Targets {
				t := &up.Targets[i]
				ct := use.plan.Targets[t.ID]
				if selfErr == nil {
					t.PeerURI, _ = chainIdentity(self, ct)
				}
				sk := targetSlotKey(k, t.ID)
				teps := snap.targetEndpoints[targetKey(ct)]
				next[sk] = assignSlots(slots[sk], teps)
				t.Servers = slotServers(next[sk], teps)
				if up.Limits != nil {
					// Envoy applies an upstream's limits to each cluster
					// of its chain: here each target backend.
					limitShares(up.Limits.Concurrent, t.Servers)
				}
			}
		}
		m.Upstreams = append(m.Upstreams, up)
	}
	return m, next
}

// slotServers are the servers of slots, filled from eps.
func slotServers(slots []string, eps []endpoint) []render.Server {
	byKey := map[string]endpoint{}
	for _, e := range eps {
		byKey[e.Key()] = e
	}
	out := make([]render.Server, 0, len(slots))
	for i, inst := range slots {
		srv := render.Server{Name: render.ServerName(i)}
		if inst != "" {
			e := byKey[inst]
			srv.Addr, srv.Port = e.Addr, e.Port
		}
		out = append(out, srv)
	}
	return out
}

// assignSlots keeps instances that are still there in their slot, frees the
// slots of those that left and fills free slots with new ones. The number
// of slots is a power of two, at least 4, so churn rarely changes it.
func assignSlots(old []string, eps []endpoint) []string {
	want := map[string]bool{}
	for _, e := range eps {
		want[e.Key()] = true
	}
	size := 4
	for size < len(eps) {
		size *= 2
	}
	if len(old) > size && len(eps) <= len(old) {
		size = len(old) // do not shrink: that would need a reload
	}
	slots := make([]string, size)
	placed := map[string]bool{}
	for i, inst := range old {
		if i < size && want[inst] {
			slots[i] = inst
			placed[inst] = true
		}
	}
	var fresh []string
	for _, e := range eps {
		if !placed[e.Key()] {
			fresh = append(fresh, e.Key())
		}
	}
	sort.Strings(fresh)
	for i := range slots {
		if len(fresh) == 0 {
			break
		}
		if slots[i] == "" {
			slots[i], fresh = fresh[0], fresh[1:]
		}
	}
	return slots
}

func leafPEM(snap snapshot) string {
	return strings.TrimSpace(snap.leaf.CertPEM) + "\n" + strings.TrimSpace(snap.leaf.PrivateKeyPEM) + "\n"
}

func rootsPEM(snap snapshot) string {
	var b strings.Builder
	for _, r := range snap.roots.Roots {
		b.WriteString(strings.TrimSpace(r.RootCertPEM) + "\n")
	}
	return b.String()
}

// apply brings HAProxy to the snapshot: it plans the change from what
// HAProxy runs, then carries the plan out.
func (s *Sidecar) apply(ctx context.Context, snap snapshot, spoaAddr string) error {
	s.logExposedChecks(snap.reg, snap.exposedChecks)
	next, err := s.target(snap, spoaAddr)
	if err != nil {
		return err
	}
	s.logChains(snap, next.chains)
	s.logSNIs(next.model)
	s.logAdminOverride(snap.reg.MetricsBinds) // settings.go
	if err := s.execute(ctx, planApply(s.proc != nil, s.applied, next), snap.pendingAt); err != nil {
		return err
	}
	s.publishChainsInUse(next.chains)
	return nil
}

// publishChainsInUse tells the watches which chains are served, so that
// the targets of a chain kept after a refusal stay watched.
func (s *Sidecar) publishChainsInUse(use map[string]chainUse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	inUse := map[string]*chain.Plan{}
	for k, u := range use {
		if u.plan != nil {
			inUse[k] = u.plan
		}
	}
	s.chainsInUse = inUse
	s.syncTargetWatchesLocked()
}

// target is the state a complete snapshot asks HAProxy to run.
func (s *Sidecar) target(snap snapshot, spoaAddr string) (appliedState, error) {
	snap.use = chooseChains(snap, s.applied.chains)
	model, slots := s.buildModel(snap, spoaAddr, s.applied.slots)
	if s.refuseInvalidChains(model, &snap) {
		model, slots = s.buildModel(snap, spoaAddr, s.applied.slots)
	}
	out, err := render.Render(model)
	if err != nil {
		return appliedState{}, err
	}
	return appliedState{model: model, out: out, leafPEM: leafPEM(snap), rootsPEM: rootsPEM(snap), slots: slots, chains: snap.use}, nil
}

// refuseInvalidChains checks each upstream served by a chain not served
// before on its own: one that the render's Validate refuses, while the
// upstream without its chain passes, is refused as plugin/chain's
// refusals are (snap.use keeps the previous chain). It reports whether
// it refused one.
func (s *Sidecar) refuseInvalidChains(m *render.Model, snap *snapshot) bool {
	refused := false
	for _, up := range m.Upstreams {
		k := upstreamKey(up)
		use := snap.use[k]
		if use.plan == nil || (s.applied.chains[k].plan == use.plan) {
			continue
		}
		one := *m
		one.Upstreams = []render.Upstream{up}
		err := one.Validate()
		if err == nil {
			continue
		}
		plain := up
		plain.Routes, plain.Targets = nil, nil
		one.Upstreams = []render.Upstream{plain}
		if one.Validate() != nil {
			continue // not the chain's fault: the whole model is refused
		}
		kept := keptChain(s.applied.chains, k)
		snap.use[k] = kept
		s.logChainRefusal(k, err, chainOutcome(kept))
		refused = true
	}
	return refused
}

// chainOutcome says what is served instead of a refused chain.
func chainOutcome(kept chainUse) string {
	switch {
	case kept.closed:
		return "no previous configuration: the upstream is served with no instances until a chain can be served"
	case kept.plan == nil:
		return "keeping the upstream's previous configuration (its own instances, no chain)"
	}
	return "keeping the upstream's previous chain"
}

// logChains logs the chains of snap: each distinct refusal once (with
// what is served instead), the approximations of each chain served once.
func (a *applier) logChains(snap snapshot, use map[string]chainUse) {
	for k, ans := range snap.chains {
		switch {
		case ans.refused != nil:
			a.logChainRefusal(k, ans.refused, chainOutcome(use[k]))
		case ans.plan != nil && use[k].plan == ans.plan:
			delete(a.chainLogged, "refused:"+k) // served: a later refusal is news again
		}
	}
	for k, u := range use {
		if u.plan == nil {
			a.logChainApproximations(k, nil)
			continue
		}
		_, _, more := convertPlan(u.plan)
		a.logChainApproximations(k, append(append([]chain.Finding{}, u.plan.Approximations...), more...))
	}
}

// applier carries plans out against HAProxy and knows what it runs. The
// apply loop owns it: nothing else reads or changes it.
type applier struct {
	launcher haproxy.Launcher
	haproxy  haproxy.Config // Binary, Dir and Logger; a start adds the admin socket
	log      hclog.Logger
	metrics  *metrics

	proc    haproxy.Instance // nil: nothing runs
	applied appliedState
	// sniLogged is the SNI last logged for each upstream (logSNIs).
	sniLogged map[string]string
	// exposedLogged are the exposed checks' states already logged.
	exposedLogged map[string]bool
	// outliers are the passive health check's counters at its last sweep
	// (outlier.go).
	outliers map[string]outlierCounts
	// adminOverridden are the registration's metrics addresses last
	// logged as overridden by -admin-bind.
	adminOverridden string
	// chainLogged are the chain refusals and approximations last logged,
	// by "refused:"/"approx:" and upstream key (chain.go).
	chainLogged map[string]string
}

// execute carries p out. since is when the change was first seen (zero:
// now), for the apply latency. On success HAProxy runs p.next; on failure
// it keeps what it ran, and so does the applier's record of it.
func (a *applier) execute(ctx context.Context, p plan, since time.Time) error {
	if since.IsZero() {
		since = time.Now()
	}
	if p.method == "" {
		a.applied = p.next // nothing HAProxy sees changed
		return nil
	}
	if err := a.writeFiles(p.files); err != nil {
		return err
	}
	method := p.method
	switch method {
	case methodStart:
		cfg := a.haproxy
		cfg.AdminSocket = p.next.model.AdminSocket
		proc, err := a.launcher.Start(ctx, cfg, p.next.out.Config)
		if err != nil {
			a.metrics.applies.WithLabelValues(method, "error").Inc()
			return err
		}
		a.proc = proc
	case methodRuntime:
		// A runtime change keeps the shape HAProxy already validated and
		// loaded (the new addresses passed Model.Validate), so it skips
		// `haproxy -c`, which costs tens of milliseconds; every reload and
		// start still validates the whole file.
		if err := a.proc.Runtime(p.runtime...); err != nil {
			a.metrics.applies.WithLabelValues(method, "error").Inc()
			a.log.Warn("runtime API update failed: reloading instead", "error", err)
			method, p.reason, p.next.caCommitted = methodReload, reasonRuntimeRefused, false
		} else if err := haproxy.WriteFileAtomic(a.proc.ConfigPath(), []byte(p.next.out.Config), 0o600); err != nil {
			return err
		}
	}
	if method == methodReload {
		if err := a.proc.Reload(ctx, p.next.out.Config); err != nil {
			a.metrics.applies.WithLabelValues(method, "error").Inc()
			return err
		}
	}
	took := time.Since(since)
	a.metrics.applies.WithLabelValues(method, "ok").Inc()
	a.metrics.applyLatency.WithLabelValues(method).Observe(took.Seconds())
	fields := []any{"method", method, "since_change", took, "upstream_instances", countServers(p.next.model)}
	if method == methodReload {
		fields = append(fields, "reload_reason", p.reason)
	}
	a.log.Info("haproxy configuration applied", fields...)
	a.applied = p.next
	return nil
}

// writeFiles writes files into HAProxy's working directory.
func (a *applier) writeFiles(files []file) error {
	for _, f := range files {
		if err := haproxy.WriteFileAtomic(filepath.Join(a.haproxy.Dir, f.name), []byte(f.data), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	return nil
}

func countServers(m *render.Model) int {
	n := 0
	for _, u := range m.Upstreams {
		for _, s := range u.Servers {
			if s.Addr != "" {
				n++
			}
		}
		for _, t := range u.Targets {
			for _, s := range t.Servers {
				if s.Addr != "" {
					n++
				}
			}
		}
	}
	return n
}
