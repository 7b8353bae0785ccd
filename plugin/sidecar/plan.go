package sidecar

import (
	"github.com/haconnect/haconnect/lua"
	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// Methods of changing HAProxy, as the apply metrics label them.
const (
	methodStart   = "start"
	methodRuntime = "runtime"
	methodReload  = "reload"
)

// appliedState is a state of HAProxy: the one it runs (the applier's), or
// the one a plan brings it to.
type appliedState struct {
	model             *render.Model
	out               *render.Output
	leafPEM, rootsPEM string
	// slots are model's upstream slots by upstream key, the instance in
	// each ("" free); the next model keeps each instance in its slot.
	slots map[string][]string
	// chains are the chains model's upstreams are served with, by
	// upstream key (chain.go): a refused chain keeps these.
	chains map[string]chainUse
	// caCommitted: the running worker has committed a CA file through
	// the runtime API since it started. HAProxy 2.6.12 cannot commit a
	// certificate after that (see planApply); a reload starts a worker
	// without one.
	caCommitted bool
}

// plan is how to bring HAProxy from the state it runs to the next one.
// planApply decides it without touching anything; applier.execute
// carries it out.
type plan struct {
	// method is start, runtime or reload; "" when nothing HAProxy sees
	// changed. A runtime plan falls back to a reload of next's
	// configuration if HAProxy refuses a command.
	method string
	// files are written first, whatever the method: a later reload or
	// restart reads them.
	files []file
	// runtime are a runtime plan's commands, in order.
	runtime []haproxy.Command
	// reason says why a reload plan reloads (the reload_reason logged).
	reason string
	next   appliedState
}

// Why a plan reloads.
const (
	reasonSPOE  = "spoe"  // the SPOE engine changed
	reasonShape = "shape" // the configuration's shape changed
	// The leaf changed after a CA file commit (see planApply).
	reasonLeafAfterCAFile = "leaf_after_ca_file"
	// The leaf changed (see planApply).
	reasonLeaf = "leaf"
	// HAProxy refused a runtime plan's command (set by the applier).
	reasonRuntimeRefused = "runtime_refused"
)

// file is one file of the working directory, written whole.
type file struct{ name, data string }

// planApply decides how HAProxy goes from prev (running or not) to next:
//   - nothing runs: start it, with every file written;
//   - the SPOE engine or the configuration's shape changed: reload;
//   - the leaf changed: reload;
//   - the CA roots or the upstream slots' addresses changed: the runtime
//     API, which keeps connections and costs no `haproxy -c`;
//   - nothing HAProxy sees changed: nothing.
func planApply(running bool, prev, next appliedState) plan {
	p := plan{next: next}
	p.next.caCommitted = false
	if !running {
		p.method = methodStart
		// upstream_peers.map starts empty: HAProxy fills it in memory.
		p.files = []file{{"leaf.pem", next.leafPEM}, {"roots.pem", next.rootsPEM},
			{"spoe.conf", next.out.SPOE}, {"haconnect.lua", string(lua.Telemetry)}, {"upstream_peers.map", ""},
			{"rate_limits.map", next.model.RateLimitMapText()}, {"latency_buckets.map", next.model.LatencyMapText()}}
		for _, f := range next.model.L7MapFiles() {
			p.files = append(p.files, file{f[0], f[1]})
		}
		return p
	}
	for _, f := range []struct{ name, data, old string }{
		{"leaf.pem", next.leafPEM, prev.leafPEM},
		{"roots.pem", next.rootsPEM, prev.rootsPEM},
		{"spoe.conf", next.out.SPOE, prev.out.SPOE},
		{"rate_limits.map", next.model.RateLimitMapText(), prev.model.RateLimitMapText()},
	} {
		if f.data != f.old {
			p.files = append(p.files, file{f.name, f.data})
		}
	}
	// The native L7 maps, for the next worker (a reload) or a restart;
	// the running one gets them through the runtime API below.
	oldL7 := prev.model.L7MapFiles()
	for i, f := range next.model.L7MapFiles() {
		if i >= len(oldL7) || oldL7[i][1] != f[1] {
			p.files = append(p.files, file{f[0], f[1]})
		}
	}
	switch {
	case next.out.SPOE != prev.out.SPOE:
		p.reason = reasonSPOE
	case next.out.Shape != prev.out.Shape || !sameSlots(prev.model, next.model):
		// (Slots that differ in number always change the shape; checked
		// on their own so that a runtime plan can never miss a server.)
		p.reason = reasonShape
	case next.leafPEM != prev.leafPEM && prev.caCommitted:
		// HAProxy 2.6.12's `commit ssl ca-file` replaces every listener
		// and server using the CA file with new ones, but leaves them out
		// of their certificate's list of users. A later `commit ssl
		// cert` walks that list: it rebuilds none of them and answers
		// "Success!" while the old leaf is still served, and frees the
		// certificate they still point to, so that the next CA file
		// commit reads freed memory (HAProxy dies). Committing the CA
		// file again first does not help: it rebuilds them with the old
		// certificate. Only a new worker serves the new leaf. (Fixed in
		// HAProxy 3.3, GitHub #3165.)
		p.reason = reasonLeafAfterCAFile
	case next.leafPEM != prev.leafPEM:
		// HAProxy 2.6.12's `commit ssl cert` rebuilds the inbound
		// listener without its `verify required` when the new
		// certificate carries no common name and no DNS name, as every
		// Consul leaf: the listener stops asking callers for their
		// certificate, and the SPOA denies every one (no_certificate)
		// until the next reload. Seen on each leaf renewal and after an
		// agent restart (a new leaf, the same roots). A reload serves
		// the new leaf with the listener's options.
		p.reason = reasonLeaf
	}
	// (A new leaf never goes through the runtime API: see above.)
	p.next.caCommitted = prev.caCommitted
	if next.rootsPEM != prev.rootsPEM {
		p.runtime = append(p.runtime, haproxy.SetSSLCAFile(next.model.RootsFile, next.rootsPEM), haproxy.CommitSSLCAFile(next.model.RootsFile))
		p.next.caCommitted = true
	}
	switch {
	case p.reason != "":
		p.method, p.runtime, p.next.caCommitted = methodReload, nil, false
	case next.out.Config != prev.out.Config:
		p.runtime = append(p.runtime, serverCommands(prev.model, next.model)...)
		p.runtime = append(p.runtime, splitCommands(prev.model, next.model)...)
	}
	if p.reason == "" {
		// The rate limits' numbers: the same tables (same shape), so the
		// counters are kept.
		p.runtime = append(p.runtime, mapCommands(next.model.RateLimitMapFile, prev.model.RateLimitMap(), next.model.RateLimitMap())...)
		p.runtime = append(p.runtime, l7MapCommands(prev.model, next.model)...)
	}
	if p.method == "" && len(p.runtime) > 0 {
		p.method = methodRuntime
	}
	return p
}

// serverCommands moves slots from one model to the next (same shape):
// the upstreams' backends, and the backends of their chains' targets.
func serverCommands(prev, next *render.Model) []haproxy.Command {
	var cmds []haproxy.Command
	for ui, u := range next.Upstreams {
		cmds = append(cmds, slotCommands(u.Backend(), prev.Upstreams[ui].Servers, u.Servers)...)
		for ti, t := range u.Targets {
			cmds = append(cmds, slotCommands(u.TargetBackend(t.ID), prev.Upstreams[ui].Targets[ti].Servers, t.Servers)...)
		}
	}
	return cmds
}

// slotCommands moves one backend's slots from prev to next (as many).
func slotCommands(backend string, prev, next []render.Server) []haproxy.Command {
	var cmds []haproxy.Command
	for si, srv := range next {
		old := prev[si]
		if old == srv {
			continue
		}
		if srv.Addr == "" {
			cmds = append(cmds, haproxy.SetServerState(backend, srv.Name, haproxy.ServerMaint))
			continue
		}
		// A slot's share of the upstream's limit (before it is made
		// ready, when it is filled now).
		if srv.MaxConn != old.MaxConn {
			cmds = append(cmds, haproxy.SetServerMaxconn(backend, srv.Name, srv.MaxConn))
		}
		same := old
		same.MaxConn = srv.MaxConn
		if same == srv {
			// Only its share changed: the same instance keeps its
			// state (a passive health check may have taken it out).
			continue
		}
		// A slot that held another address goes through maintenance
		// first: HAProxy closes a server's idle connections when it stops
		// being usable, and would otherwise keep reusing connections to
		// the old address after `set server addr` (seen after a DNS
		// change). Requests in flight are not cut.
		if old.Addr != "" && (old.Addr != srv.Addr || old.Port != srv.Port) {
			cmds = append(cmds, haproxy.SetServerState(backend, srv.Name, haproxy.ServerMaint))
		}
		// Consul reports the instance passing: take it at its word
		// ("health up") rather than wait for HAProxy's first check;
		// HAProxy's own checks still take it out if it fails.
		cmds = append(cmds,
			haproxy.SetServerAddr(backend, srv.Name, srv.Addr, srv.Port),
			haproxy.SetServerState(backend, srv.Name, haproxy.ServerReady),
			haproxy.SetServerHealth(backend, srv.Name, haproxy.HealthUp))
	}
	return cmds
}

// sameSlots reports whether two models have the same backends with the
// same slots, which serverCommands needs.
func sameSlots(prev, next *render.Model) bool {
	if len(prev.Upstreams) != len(next.Upstreams) {
		return false
	}
	for ui, u := range next.Upstreams {
		p := prev.Upstreams[ui]
		if p.Backend() != u.Backend() || len(p.Servers) != len(u.Servers) || len(p.Targets) != len(u.Targets) {
			return false
		}
		for ti, t := range u.Targets {
			if p.Targets[ti].ID != t.ID || len(p.Targets[ti].Servers) != len(t.Servers) {
				return false
			}
		}
	}
	return true
}

// splitCommands sets the discovery-chain split bounds that changed (same
// shape, so the same variables): a new weight without a reload.
func splitCommands(prev, next *render.Model) []haproxy.Command {
	old := map[string]int{}
	for _, v := range prev.SplitVars() {
		old[v.Name] = v.Value
	}
	var cmds []haproxy.Command
	for _, v := range next.SplitVars() {
		if old[v.Name] != v.Value {
			cmds = append(cmds, haproxy.SetProcVar(v.Name, v.Value))
		}
	}
	return cmds
}
