package sidecar

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/internal/meshid"
	"github.com/haconnect/haconnect/plugin/chain"
	"github.com/haconnect/haconnect/plugin/render"
)

// The discovery chain of every upstream is watched
// (/v1/discovery-chain/<upstream>, compiled as Consul compiles it for an
// Envoy sidecar's upstream: consulwatch.CompiledChain). What is done with
// it:
//   - a chain Consul reports as Default (no service-resolver, -splitter or
//     -router entry) changes nothing: the upstream is served from its own
//     health watch, as without a chain;
//   - any other chain is read by plugin/chain into routes, splits and
//     targets; each target gets a backend of its own, filled from a health
//     watch of its own (its service, datacenter, subset filter), with the
//     identity of its own service;
//   - a chain that cannot be honoured (plugin/chain refuses it, or the
//     render's Validate refuses what it becomes) keeps the upstream's
//     previous configuration; one that is refused before any was served
//     serves the upstream with no instances (fail closed: HTTP callers get
//     503, TCP connections are closed), since the default path could send
//     callers where the chain says they must not go. Each distinct refusal
//     is logged once, naming every refused setting, and counted;
//   - a chain that cannot be read at all (its watch fails, or has not
//     answered within upstreamGrace) serves the upstream as today, from
//     its own instances, until it is read.

// chainAnswer is the last answer of an upstream's chain watch.
type chainAnswer struct {
	def     bool        // Consul's default chain
	plan    *chain.Plan // a chain plugin/chain compiled
	refused error       // or why plugin/chain refused it
}

// chainUse is the chain an upstream is served with.
type chainUse struct {
	plan   *chain.Plan // nil: the default path (no Routes)
	closed bool        // refused with nothing served before: no instances
}

// chainWatch is the chain watch of one upstream, for one query (a
// changed protocol or connect timeout restarts it).
type chainWatch struct {
	*upstreamWatch
	query consulwatch.CompiledChain
}

// chainQuery is how an upstream's chain is asked for: compiled in its
// datacenter, with its protocol and connect timeout (if set) as
// overrides, as Consul's proxycfg does for Envoy.
func chainQuery(u render.Upstream) consulwatch.CompiledChain {
	return consulwatch.CompiledChain{Service: u.Name, Datacenter: u.Datacenter, Protocol: u.Protocol,
		ConnectTimeout: time.Duration(u.ConnectTimeoutMS) * time.Millisecond}
}

// targetKey names a target's health watch: everything its query depends
// on. Targets of several upstreams (or chains) asking the same share it.
func targetKey(t chain.Target) string {
	return t.Service + "|" + t.Datacenter + "|" + strconv.FormatBool(t.OnlyPassing) + "|" + t.Filter
}

func targetQuery(t chain.Target) consulwatch.UpstreamHealth {
	return consulwatch.UpstreamHealth{Service: t.Service, Datacenter: t.Datacenter, Filter: t.Filter, WarningHealthy: !t.OnlyPassing}
}

// syncChainWatchLocked starts the chain watch of upstream u (key k) if it
// has none or its query changed.
func (s *Sidecar) syncChainWatchLocked(ctx context.Context, k string, u render.Upstream) {
	q := chainQuery(u)
	if cw, ok := s.chainWatching[k]; ok {
		if cw.query == q {
			return
		}
		cw.cancel()
		delete(s.chainWatching, k)
		delete(s.chains, k)
	}
	wctx, cancel := context.WithCancel(ctx)
	cw := &chainWatch{upstreamWatch: &upstreamWatch{cancel: cancel, status: consulwatch.NewStatus(), started: time.Now()}, query: q}
	s.chainWatching[k] = cw
	s.watchCtx = ctx
	hooks := s.hooks(q)
	hooks.Status = cw.status
	logFailing := hooks.OnFailing
	hooks.OnFailing = func(err error) {
		logFailing(err)
		s.update(func() { cw.err = err })
	}
	go s.wakeAfter(wctx, upstreamGrace)
	go consulwatch.Run(wctx, s.client, q, hooks, func(raw consulwatch.RawChain) {
		ans := readChain(raw)
		s.update(func() {
			if wctx.Err() == nil {
				s.chains[k] = ans
				s.syncTargetWatchesLocked()
			}
		})
	})
}

// readChain compiles a non-default chain.
func readChain(raw consulwatch.RawChain) chainAnswer {
	if raw.Default {
		return chainAnswer{def: true}
	}
	plan, err := chain.Compile(raw.Body)
	if err != nil {
		return chainAnswer{refused: err}
	}
	return chainAnswer{plan: plan}
}

// stopChainWatchLocked stops the chain watch of an upstream no longer
// registered.
func (s *Sidecar) stopChainWatchLocked(k string) {
	if cw, ok := s.chainWatching[k]; ok {
		cw.cancel()
		delete(s.chainWatching, k)
	}
	delete(s.chains, k)
	delete(s.chainsInUse, k)
	s.syncTargetWatchesLocked()
}

// syncTargetWatchesLocked keeps one health watch per target of the
// chains last answered and of the chains served (a refused chain keeps
// the previous one's targets served, so they stay watched).
func (s *Sidecar) syncTargetWatchesLocked() {
	want := map[string]chain.Target{}
	for _, plans := range []map[string]*chain.Plan{answeredPlans(s.chains), s.chainsInUse} {
		for _, p := range plans {
			if p == nil {
				continue
			}
			for _, t := range p.Targets {
				want[targetKey(t)] = t
			}
		}
	}
	for tk, tw := range s.targetWatching {
		if _, ok := want[tk]; !ok {
			tw.cancel()
			delete(s.targetWatching, tk)
			delete(s.targetEndpoints, tk)
		}
	}
	if s.watchCtx == nil {
		return
	}
	for tk, t := range want {
		if _, ok := s.targetWatching[tk]; ok {
			continue
		}
		wctx, cancel := context.WithCancel(s.watchCtx)
		tw := &upstreamWatch{cancel: cancel, status: consulwatch.NewStatus(), started: time.Now()}
		s.targetWatching[tk] = tw
		query := targetQuery(t)
		hooks := s.hooks(query)
		hooks.Status = tw.status
		logFailing := hooks.OnFailing
		hooks.OnFailing = func(err error) {
			logFailing(err)
			s.update(func() { tw.err = err })
		}
		go s.wakeAfter(wctx, upstreamGrace)
		tk := tk
		go consulwatch.Run(wctx, s.client, query, hooks, func(eps []endpoint) {
			// A target behind a terminating gateway is refused by
			// plugin/chain (External); gateways answering for a
			// linked service are left out as for an upstream.
			eps, _ = withoutGateways(eps)
			s.update(func() {
				if wctx.Err() == nil {
					s.targetEndpoints[tk] = eps
				}
			})
		})
	}
}

func answeredPlans(chains map[string]chainAnswer) map[string]*chain.Plan {
	out := map[string]*chain.Plan{}
	for k, a := range chains {
		out[k] = a.plan
	}
	return out
}

// chooseChains decides, for each upstream of snap, the chain it is
// served with: the one Consul answered if it is servable, else the one
// served before (or none: closed), else, unread, the default path.
func chooseChains(snap snapshot, prev map[string]chainUse) map[string]chainUse {
	use := map[string]chainUse{}
	if snap.reg == nil {
		return use
	}
	for _, u := range snap.reg.Upstreams {
		k := upstreamKey(u)
		ans, ok := snap.chains[k]
		switch {
		case !ok || ans.def:
			use[k] = chainUse{}
		case ans.plan != nil:
			use[k] = chainUse{plan: ans.plan}
		default:
			use[k] = keptChain(prev, k)
		}
	}
	return use
}

// keptChain is what upstream k is served with when its new chain is
// refused: the previous chain, or no instances if there was none.
func keptChain(prev map[string]chainUse, k string) chainUse {
	if p, ok := prev[k]; ok {
		return p
	}
	return chainUse{closed: true}
}

// chainIdentity is the identity and SNI of a target's instances: its own
// service (a redirect or failover to another service expects that
// service's certificate), in its datacenter and namespace.
func chainIdentity(self meshid.Service, t chain.Target) (string, error) {
	peer := self
	peer.Name = t.Service
	if t.Datacenter != "" {
		peer.Datacenter = t.Datacenter
	}
	if t.Namespace != "" {
		peer.Namespace = t.Namespace
	}
	if t.Partition != "" {
		peer.Partition = t.Partition
	}
	id, err := peer.ID()
	if err != nil {
		return "", fmt.Errorf("chain target %q: %w", t.ID, err)
	}
	return id.String(), nil
}

// convertPlan turns a compiled chain into the render model's routes and
// targets (without servers: the slots are filled by buildModel). It also
// returns the places where the model cannot say exactly what Envoy does,
// to be logged as approximations with the chain's own.
func convertPlan(p *chain.Plan) ([]render.Route, []render.Target, []chain.Finding) {
	var approx []chain.Finding
	ms := func(d time.Duration) int { return int(d / time.Millisecond) }
	tcp := !render.IsHTTP(p.Protocol)
	balance := map[string]chain.Balance{}
	var routes []render.Route
	for ri, r := range p.Routes {
		out := render.Route{Match: r.Match, PrefixRewrite: r.PrefixRewrite, RewriteFrom: r.RewriteFrom,
			RequestTimeoutMS: ms(r.RequestTimeout), IdleTimeoutMS: ms(r.IdleTimeout), Retry: r.Retry,
			RequestHeaders: r.RequestHeaders, ResponseHeaders: r.ResponseHeaders}
		// A resolver's RequestTimeout bounds the route's requests when
		// the route gives none and sends all of them to that resolver.
		// (Envoy applies it only when the chain starts at the resolver;
		// a router's catch-all or a one-way split to it gets it here too.)
		// A TCP upstream has no requests: Envoy's tcp_proxy ignores it.
		if out.RequestTimeoutMS == 0 && len(r.Splits) == 1 && !tcp {
			out.RequestTimeoutMS = ms(r.Splits[0].Resolver.RequestTimeout)
		}
		for si, sp := range r.Splits {
			out.Splits = append(out.Splits, render.Split{Weight: sp.Weight, Targets: sp.Resolver.Targets,
				RequestHeaders: sp.RequestHeaders, ResponseHeaders: sp.ResponseHeaders})
			if len(r.Splits) > 1 && sp.Resolver.RequestTimeout > 0 && r.RequestTimeout == 0 {
				approx = append(approx, chain.Finding{Setting: fmt.Sprintf("route %d split %d: service-resolver RequestTimeout", ri, si),
					Value: sp.Resolver.RequestTimeout.String(), Why: "not applied to a split route (as Envoy): the route's timeout, or the listener's"})
			}
			// A target's balance is its resolver's; a target reached
			// through two resolvers (a shared failover target) takes the
			// first one's, in route order.
			for _, id := range sp.Resolver.Targets {
				if b, seen := balance[id]; !seen {
					balance[id] = sp.Resolver.Balance
				} else if !sameBalance(b, sp.Resolver.Balance) {
					approx = append(approx, chain.Finding{Setting: "target " + id + " load balancer", Value: sp.Resolver.Balance.Algorithm,
						Why: "the target is reached through resolvers with different policies: its backend balances as the first (" + b.Algorithm + ")"})
				}
			}
		}
		routes = append(routes, out)
	}
	ids := make([]string, 0, len(p.Targets))
	for id := range p.Targets {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var targets []render.Target
	for _, id := range ids {
		t := p.Targets[id]
		b, ok := balance[id]
		if !ok {
			b = chain.Balance{Algorithm: "roundrobin"}
		}
		if tcp && b.Algorithm == "hash" {
			b, approx = tcpBalance(id, b, approx)
		}
		targets = append(targets, render.Target{ID: id, SNI: t.SNI, ConnectTimeoutMS: ms(t.ConnectTimeout), Balance: b})
	}
	return routes, targets, approx
}

// tcpBalance keeps, of a TCP target's hash keys, the source address: a
// TCP connection has no header, cookie or query to hash (Envoy's
// tcp_proxy hashes only the source address too); with no key left,
// connections spread at random, as Envoy's ring hash without a policy.
func tcpBalance(id string, b chain.Balance, approx []chain.Finding) (chain.Balance, []chain.Finding) {
	out := chain.Balance{Algorithm: "hash"}
	for _, k := range b.Keys {
		if k.Kind == "source_ip" {
			out.Keys = append(out.Keys, k)
			continue
		}
		approx = append(approx, chain.Finding{Setting: "target " + id + " load balancer hash policy", Value: k.Kind + " " + k.Name,
			Why: "a TCP upstream has no request to read it from: not part of the key"})
	}
	if len(out.Keys) == 0 {
		out.Algorithm = "random"
	}
	return out, approx
}

func sameBalance(a, b chain.Balance) bool {
	if a.Algorithm != b.Algorithm || len(a.Keys) != len(b.Keys) {
		return false
	}
	for i := range a.Keys {
		if a.Keys[i] != b.Keys[i] {
			return false
		}
	}
	return true
}

// targetSlotKey keys a target backend's slots: stable while the upstream
// and the target ID stay.
func targetSlotKey(k, id string) string { return k + "::" + id }

// logChainFindings logs, once per upstream and distinct text, a chain
// refused (Error) and a chain's approximations (Warn), and counts each
// distinct refusal.
func (a *applier) logChainRefusal(k string, err error, outcome string) {
	if a.chainLogged == nil {
		a.chainLogged = map[string]string{}
	}
	msg := err.Error() + "|" + outcome
	if a.chainLogged["refused:"+k] == msg {
		return
	}
	a.chainLogged["refused:"+k] = msg
	a.metrics.chainRefusals.Inc()
	a.log.Error("discovery chain refused: "+outcome, "upstream", k, "refused", err.Error())
}

func (a *applier) logChainApproximations(k string, approx []chain.Finding) {
	if a.chainLogged == nil {
		a.chainLogged = map[string]string{}
	}
	if len(approx) == 0 {
		delete(a.chainLogged, "approx:"+k)
		return
	}
	texts := make([]string, len(approx))
	for i, f := range approx {
		texts[i] = f.String()
	}
	msg := strings.Join(texts, "; ")
	if a.chainLogged["approx:"+k] == msg {
		return
	}
	a.chainLogged["approx:"+k] = msg
	a.log.Warn("discovery chain served in HAProxy's closest terms", "upstream", k, "approximations", msg)
}
