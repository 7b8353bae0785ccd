package authz

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/backoff"
	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/consulwatch"
)

// run keeps one blocking query going for as long as ctx lives, tracking
// whether Consul answers it and logging each change of state once.
// endpoint is what a refused token must be granted access to.
func (a *Authorizer) run(ctx context.Context, query, what, endpoint string, status *consulwatch.Status, fetch consulwatch.Fetch) {
	w := consulwatch.Watch{
		Fetch:    fetch,
		Status:   status,
		WaitTime: a.cfg.WaitTime,
		Backoff:  backoff.New(50*time.Millisecond, 2*time.Second),
		OnError:  func(error) { a.cfg.Metrics.consulError(query) },
		OnFailing: func(err error) {
			a.failing.Add(1)
			a.cfg.Metrics.setConsulUp(false)
			if _, refused := consulflags.Refused(err); refused {
				a.log.Error("consul refused the ACL token: serving cached decisions within the stale window, denying new callers",
					"watch", what, "stale_window", a.cfg.StaleWindow, "error", consulflags.Explain(err, "calling "+endpoint))
			} else {
				a.log.Warn("consul unreachable: serving cached decisions within the stale window, denying new callers",
					"watch", what, "stale_window", a.cfg.StaleWindow, "error", err)
			}
		},
		OnRecovered: func() {
			if a.failing.Add(-1) == 0 {
				a.cfg.Metrics.setConsulUp(true)
			}
			a.log.Info("consul reachable again", "watch", what)
		},
	}
	if a.failing.Load() == 0 {
		a.cfg.Metrics.setConsulUp(true)
	}
	w.Run(ctx)
	if status.Failing() { // a dropped destination's failing watch no longer counts
		if a.failing.Add(-1) == 0 {
			a.cfg.Metrics.setConsulUp(true)
		}
	}
}

// watchTarget starts the watches of one destination: its intentions and
// its protocol. They stop when ctx does.
func (a *Authorizer) watchTarget(ctx context.Context, t *target) {
	go a.run(ctx, queryIntentions, "intentions for "+t.name,
		"/v1/connect/intentions/match?by=destination&name="+t.name, t.intentions,
		func(ctx context.Context, q *api.QueryOptions) (consulwatch.Result, error) {
			return a.queryIntentions(t, q)
		})
	go a.run(ctx, queryChain, "protocol of "+t.name, "/v1/discovery-chain/"+t.name, t.chain,
		func(ctx context.Context, q *api.QueryOptions) (consulwatch.Result, error) {
			return a.queryProtocol(t, q)
		})
}

func (a *Authorizer) queryRoots(_ context.Context, q *api.QueryOptions) (consulwatch.Result, error) {
	list, meta, err := a.watch.Agent().ConnectCARoots(q)
	if err != nil {
		return consulwatch.Result{}, err
	}
	tr, err := newTrust(list)
	if err != nil {
		return consulwatch.Result{}, err
	}
	old := a.trust.Swap(tr)
	if old == nil || old.domain != tr.domain {
		a.log.Info("trust domain loaded", "trust_domain", tr.domain)
	}
	if old != nil && meta.LastIndex != q.WaitIndex {
		// A rotated root may leave cached callers without a valid chain.
		a.forgetCallers()
		for _, t := range a.snapshot() {
			a.notify(t.name)
		}
	}
	return consulwatch.Result{Index: meta.LastIndex}, nil
}

func (a *Authorizer) queryIntentions(t *target, q *api.QueryOptions) (consulwatch.Result, error) {
	res, meta, err := a.watch.Connect().IntentionMatch(&api.IntentionMatch{
		By:    api.IntentionMatchDestination,
		Names: []string{t.name},
	}, q)
	if err != nil {
		return consulwatch.Result{}, err
	}
	if meta.LastIndex != q.WaitIndex || !t.intentions.IsLoaded() {
		list := res[t.name]
		perms := make([]*Permissions, len(list))
		for i, ixn := range list {
			if len(ixn.Permissions) > 0 {
				perms[i] = compilePermissions(t.name, ixn, a.cfg.Metrics)
			}
		}
		a.update(t, "intentions", func(rs *ruleSet) { rs.intentions, rs.perms = list, perms })
	}
	return consulwatch.Result{Index: meta.LastIndex}, nil
}

// queryProtocol watches the destination's protocol, which decides whether
// its L7 intentions can be enforced. The discovery chain resolves it as
// Consul's proxies do: service-defaults, then proxy-defaults, then tcp.
func (a *Authorizer) queryProtocol(t *target, q *api.QueryOptions) (consulwatch.Result, error) {
	res, meta, err := a.watch.DiscoveryChain().Get(t.name, nil, q)
	if err != nil {
		return consulwatch.Result{}, err
	}
	protocol := "tcp"
	if res.Chain != nil && res.Chain.Protocol != "" {
		protocol = res.Chain.Protocol
	}
	t.mu.RLock()
	changed := t.rules.protocol != protocol
	t.mu.RUnlock()
	if changed || !t.chain.IsLoaded() {
		a.update(t, "protocol", func(rs *ruleSet) { rs.protocol = protocol })
	}
	return consulwatch.Result{Index: meta.LastIndex}, nil
}

// janitor runs for as long as ctx lives. For each destination it notices
// when Consul has not answered past the stale window (then every caller is
// denied, and holders of open connections are told), calls OnChange again
// while a Recheck could not decide, and stops watching destinations
// nobody asked about for TargetIdle.
func (a *Authorizer) janitor(ctx context.Context) {
	period := min(max(a.cfg.StaleWindow/10, 50*time.Millisecond), time.Second)
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		for _, t := range a.snapshot() {
			a.checkFreshness(t, now)
			if t.recheck.Swap(false) {
				a.notify(t.name)
			}
		}
		a.expireIdle(now)
	}
}

// checkFreshness logs and reports a destination's passage past the stale
// window, and back.
func (a *Authorizer) checkFreshness(t *target, now time.Time) {
	if !t.intentions.IsLoaded() || !t.chain.IsLoaded() || !a.roots.IsLoaded() {
		return // nothing was ever served for it
	}
	stale := !a.fresh(t, now)
	if stale == t.stale {
		return
	}
	t.stale = stale
	a.cfg.Metrics.setStale(t.name, stale)
	if stale {
		a.log.Error("consul has not answered about this destination's intentions past the stale window: denying every caller",
			"target", t.name, "stale_window", a.cfg.StaleWindow, "last_answer", t.intentions.Age(now).Round(time.Millisecond).String()+" ago")
		a.notify(t.name)
		return
	}
	a.log.Info("consul answers about this destination's intentions again: serving decisions", "target", t.name)
}

func (a *Authorizer) expireIdle(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, t := range a.targets {
		if !t.pinned && now.UnixNano()-t.lastUsed.Load() > int64(a.cfg.TargetIdle) {
			a.dropLocked(t, "idle")
		}
	}
}

// defaultReasonPrefix is how the agent's authorize endpoint words a decision
// taken by the ACL default policy.
const defaultReasonPrefix = "Default behavior"

// defaultDecision returns the ACL default policy for callers no intention
// matches. Consul exposes it only through the authorize endpoint, so it asks
// that endpoint about this caller. The agent answers from its own intention
// cache, which may lag a change by a few milliseconds; while it still reports
// a matching intention that our list no longer has (or the reverse), ask
// again briefly, then give up and deny.
func (a *Authorizer) defaultDecision(t *target, id *Identity) (bool, Reason, error) {
	if p := t.defaultPolicy.Load(); p != nil && time.Since(p.learned) < a.cfg.DefaultPolicyTTL {
		return p.allow, 0, nil
	}
	deadline := time.Now().Add(250 * time.Millisecond)
	for {
		res, err := a.call.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{
			Target:        t.name,
			ClientCertURI: id.ID.String(),
		})
		if err != nil {
			a.cfg.Metrics.consulError(queryAuthorize)
			return false, ReasonConsulError, explainACL(err, t.name)
		}
		if strings.HasPrefix(res.Reason, defaultReasonPrefix) {
			t.policyErr.Store(nil)
			t.defaultPolicy.Store(&defaultPolicy{allow: res.Authorized, learned: time.Now()})
			return res.Authorized, 0, nil
		}
		if time.Now().After(deadline) {
			return false, ReasonConsulInconsistent,
				fmt.Errorf("the agent still answers %q where no intention matches", res.Reason)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
