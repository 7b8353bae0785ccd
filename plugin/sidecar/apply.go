package sidecar

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/haconnect/haconnect/lua"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// applyLoop applies every change until ctx is done. HAProxy is started on
// the first complete state; a HAProxy that dies is started again.
func (s *Sidecar) applyLoop(ctx context.Context, spoaAddr, service string) error {
	waitingLogged := ""
	startBackoff := time.Second
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
			s.proc = nil
			s.applied = appliedState{}
			time.Sleep(200 * time.Millisecond)
		case <-s.changed:
			// Let a burst of changes (e.g. a rotation touching roots and
			// leaf) arrive before rendering.
			time.Sleep(2 * time.Millisecond)
		}
		snap := s.snapshot()
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

// wakeAfter wakes the apply loop after d.
func (s *Sidecar) wakeAfter(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
		select {
		case s.changed <- struct{}{}:
		default:
		}
	}
}

// requeue keeps the first pending time of changes that could not be applied
// yet, so the apply latency covers the wait.
func (s *Sidecar) requeue(at time.Time) {
	if at.IsZero() {
		return
	}
	s.mu.Lock()
	if s.pendingAt.IsZero() || at.Before(s.pendingAt) {
		s.pendingAt = at
	}
	s.mu.Unlock()
}

// buildModel turns a complete snapshot into a render model, keeping every
// upstream instance in the slot it already had.
func (s *Sidecar) buildModel(snap snapshot, spoaAddr string) *render.Model {
	reg := snap.reg
	m := &render.Model{
		Service:     reg.Service,
		LeafFile:    s.path("leaf.pem"),
		RootsFile:   s.path("roots.pem"),
		SPOEFile:    s.path("spoe.conf"),
		AdminSocket: s.path("admin.sock"),
		SPOAAddr:    spoaAddr,
		SelfURI:     snap.leaf.ServiceURI,
		AdminBind:   s.cfg.AdminBind,
		LuaFile:     s.path("haconnect.lua"),
		PeerMapFile: s.path("upstream_peers.map"),
		Threads:     s.cfg.Threads,
		AccessLog:   s.cfg.AccessLog,
		Inbound: render.Inbound{
			BindAddr: reg.BindAddr, BindPort: reg.BindPort, Protocol: reg.Protocol,
			LocalAddr: reg.LocalAddr, LocalPort: reg.LocalPort,
			LocalConnectTimeoutMS: reg.LocalConnectTimeoutMS,
			LocalRequestTimeoutMS: reg.LocalRequestTimeoutMS,
		},
	}
	localDC := datacenterOf(snap.leaf.ServiceURI)
	live := map[string]bool{}
	for _, u := range reg.Upstreams {
		k := upstreamKey(u)
		live[k] = true
		slots := assignSlots(s.slots[k], snap.endpoints[k])
		s.slots[k] = slots
		byKey := map[string]endpoint{}
		for _, e := range snap.endpoints[k] {
			byKey[e.Key()] = e
		}
		up := render.Upstream{
			Name: u.Name, Datacenter: u.Datacenter, BindAddr: u.BindAddr, BindPort: u.BindPort,
			Protocol: u.Protocol, ConnectTimeoutMS: u.ConnectTimeoutMS,
			PeerURI: peerURI(snap.roots.TrustDomain, localDC, u),
		}
		for i, inst := range slots {
			srv := render.Server{Name: render.ServerName(i)}
			if inst != "" {
				e := byKey[inst]
				srv.Addr, srv.Port = e.Addr, e.Port
			}
			up.Servers = append(up.Servers, srv)
		}
		m.Upstreams = append(m.Upstreams, up)
	}
	for k := range s.slots {
		if !live[k] {
			delete(s.slots, k)
		}
	}
	return m
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

// apply brings HAProxy to the snapshot: start, runtime API, or reload.
func (s *Sidecar) apply(ctx context.Context, snap snapshot, spoaAddr string) error {
	model := s.buildModel(snap, spoaAddr)
	out, err := render.Render(model)
	if err != nil {
		return err
	}
	leaf, roots := leafPEM(snap), rootsPEM(snap)
	start := snap.pendingAt
	if start.IsZero() {
		start = time.Now()
	}
	prev := s.applied
	method := ""
	switch {
	case s.proc == nil:
		method = "start"
		if err := s.writeFiles(appliedState{}, leaf, roots, out.SPOE); err != nil {
			return err
		}
		proc, err := s.cfg.Launcher.Start(ctx, haproxy.Config{Binary: s.cfg.HAProxyBinary, Dir: s.cfg.Dir,
			AdminSocket: model.AdminSocket, Logger: s.log}, out.Config)
		if err != nil {
			s.metrics.applies.WithLabelValues(method, "error").Inc()
			return err
		}
		s.proc = proc
	default:
		var cmds []string
		reload := out.SPOE != prev.out.SPOE || out.Shape != prev.out.Shape
		if leaf != prev.leafPEM {
			cmds = append(cmds, "set ssl cert "+model.LeafFile+" <<\n"+leaf, "commit ssl cert "+model.LeafFile)
		}
		if roots != prev.rootsPEM {
			cmds = append(cmds, "set ssl ca-file "+model.RootsFile+" <<\n"+roots, "commit ssl ca-file "+model.RootsFile)
		}
		if out.Config != prev.out.Config && !reload {
			cmds = append(cmds, serverCommands(prev.model, model)...)
		}
		if !reload && len(cmds) == 0 {
			return nil // nothing HAProxy sees changed
		}
		// Files first: a later reload or restart reads them. A runtime
		// change keeps the shape HAProxy already validated and loaded (the
		// new addresses passed Model.Validate), so it skips `haproxy -c`,
		// which costs tens of milliseconds; every reload and start still
		// validates the whole file.
		if err := s.writeFiles(prev, leaf, roots, out.SPOE); err != nil {
			return err
		}
		if !reload {
			method = "runtime"
			if err := s.proc.Runtime(cmds...); err != nil {
				s.metrics.applies.WithLabelValues(method, "error").Inc()
				s.log.Warn("runtime API update failed: reloading instead", "error", err)
				reload = true
			} else if err := haproxy.WriteFileAtomic(s.proc.ConfigPath(), []byte(out.Config), 0o600); err != nil {
				return err
			}
		}
		if reload {
			method = "reload"
			if err := s.proc.Reload(ctx, out.Config); err != nil {
				s.metrics.applies.WithLabelValues(method, "error").Inc()
				return err
			}
		}
	}
	took := time.Since(start)
	s.metrics.applies.WithLabelValues(method, "ok").Inc()
	s.metrics.applyLatency.WithLabelValues(method).Observe(took.Seconds())
	s.log.Info("haproxy configuration applied", "method", method, "since_change", took,
		"upstream_instances", countServers(model))
	s.applied = appliedState{model: model, out: out, leafPEM: leaf, rootsPEM: roots}
	return nil
}

// writeFiles writes the files whose content differs from what was applied
// last; with nothing applied yet (a start) it writes them all, the Lua
// script included.
func (s *Sidecar) writeFiles(prev appliedState, leaf, roots, spoe string) error {
	type file struct{ name, data, old string }
	start := prev.out == nil
	files := []file{{"leaf.pem", leaf, prev.leafPEM}, {"roots.pem", roots, prev.rootsPEM}}
	if start {
		// upstream_peers.map starts empty: HAProxy fills it in memory.
		files = append(files, file{"spoe.conf", spoe, ""}, file{"haconnect.lua", string(lua.Telemetry), ""},
			file{"upstream_peers.map", "", ""})
	} else {
		files = append(files, file{"spoe.conf", spoe, prev.out.SPOE})
	}
	for _, f := range files {
		if !start && f.data == f.old {
			continue
		}
		if err := haproxy.WriteFileAtomic(s.path(f.name), []byte(f.data), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	return nil
}

// serverCommands moves slots from one model to the next (same shape).
func serverCommands(prev, next *render.Model) []string {
	var cmds []string
	for ui, u := range next.Upstreams {
		backend := render.BackendName(u.Name)
		for si, srv := range u.Servers {
			old := prev.Upstreams[ui].Servers[si]
			if old == srv {
				continue
			}
			id := backend + "/" + srv.Name
			if srv.Addr == "" {
				cmds = append(cmds, "set server "+id+" state maint")
				continue
			}
			// Consul reports the instance passing: take it at its word
			// ("health up") rather than wait for HAProxy's first check;
			// HAProxy's own checks still take it out if it fails.
			cmds = append(cmds,
				fmt.Sprintf("set server %s addr %s port %d", id, srv.Addr, srv.Port),
				"set server "+id+" state ready",
				"set server "+id+" health up")
		}
	}
	return cmds
}

func countServers(m *render.Model) int {
	n := 0
	for _, u := range m.Upstreams {
		for _, s := range u.Servers {
			if s.Addr != "" {
				n++
			}
		}
	}
	return n
}
