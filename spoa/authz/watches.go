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

// hooks are what the authorizer does around each of its watches: count
// errors, track whether Consul answers, and log each change of state once.
func (a *Authorizer) hooks(query, what, endpoint string) consulwatch.Watch {
	return consulwatch.Watch{
		WaitTime: a.cfg.WaitTime,
		Backoff:  backoff.New(50*time.Millisecond, 2*time.Second),
		OnError:  func(error) { a.cfg.Metrics.consulError(query) },
		OnFailing: func(err error) {
			a.failing.Add(1)
			a.cfg.Metrics.setConsulUp(false)
			if _, refused := consulflags.Refused(err); refused {
				a.log.Error("consul refused the ACL token: serving cached decisions within the stale window, denying new callers",
					"watch", what, "stale_window", a.cfg.StaleWindow, "error", consulwatch.ExplainRefusal(endpoint, err))
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
}

// watch runs one of the authorizer's watches until ctx is done.
func watch[T any](ctx context.Context, a *Authorizer, query consulwatch.Query[T], status *consulwatch.Status, metric string, apply func(T)) {
	w := a.hooks(metric, query.Name(), query.Endpoint())
	w.Status = status
	consulwatch.Run(ctx, a.watch, query, w, apply)
	if status.Failing() { // a dropped destination's failing watch no longer counts
		if a.failing.Add(-1) == 0 {
			a.cfg.Metrics.setConsulUp(true)
		}
	}
}

// watchRoots keeps the CA roots current, unless the process already
// watches them (Config.Roots), and follows them.
func (a *Authorizer) watchRoots(ctx context.Context) {
	if a.cfg.Roots == nil {
		q := consulwatch.Roots{}
		go a.roots.Watch(ctx, a.watch, q, a.hooks(queryRoots, q.Name(), q.Endpoint()))
	}
	a.roots.Subscribe(a.setRoots)
}

func (a *Authorizer) setRoots(list *api.CARootList) {
	tr, err := newTrust(list)
	if err != nil {
		a.log.Error("unusable CA roots: keeping the previous ones", "error", err)
		return
	}
	old := a.trust.Swap(tr)
	if old == nil || old.domain != tr.domain {
		a.log.Info("trust domain loaded", "trust_domain", tr.domain)
	}
	if old != nil {
		// A rotated root may leave cached callers without a valid chain.
		a.forgetCallers()
		for _, t := range a.snapshot() {
			a.notify(t.name)
		}
	}
}

// watchDestination starts the watches of one destination: its intentions and
// its protocol. They stop when ctx does.
func (a *Authorizer) watchDestination(ctx context.Context, t *destination) {
	go watch(ctx, a, consulwatch.IntentionsMatch{Destination: t.name}, t.intentions, queryIntentions, func(list []*api.Intention) {
		perms := make([]*Permissions, len(list))
		for i, ixn := range list {
			if len(ixn.Permissions) > 0 {
				perms[i] = compilePermissions(t.name, ixn, a.cfg.Metrics)
			}
		}
		a.update(t, "intentions", func(rs *ruleSet) { rs.intentions, rs.perms = list, perms })
	})
	// The protocol decides whether the destination's L7 intentions can be
	// enforced. The discovery chain resolves it as Consul's proxies do:
	// service-defaults, then proxy-defaults, then tcp.
	go watch(ctx, a, consulwatch.DiscoveryChain{Service: t.name}, t.chain, queryChain, func(chain *api.CompiledDiscoveryChain) {
		protocol := "tcp"
		if chain != nil && chain.Protocol != "" {
			protocol = chain.Protocol
		}
		t.mu.RLock()
		changed := t.rules.protocol != protocol
		t.mu.RUnlock()
		if changed {
			a.update(t, "protocol", func(rs *ruleSet) { rs.protocol = protocol })
		}
	})
}

// janitor runs for as long as ctx lives. For each destination it notices
// when Consul has not answered past the stale window (then every caller is
// denied, and holders of open connections are told), calls OnChange again
// while a Recheck could not decide, and stops watching destinations
// nobody asked about for DestinationIdle.
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
func (a *Authorizer) checkFreshness(t *destination, now time.Time) {
	if !t.intentions.IsLoaded() || !t.chain.IsLoaded() || !a.roots.Status.IsLoaded() {
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
			"destination", t.name, "stale_window", a.cfg.StaleWindow, "last_answer", t.intentions.Age(now).Round(time.Millisecond).String()+" ago")
		a.notify(t.name)
		return
	}
	a.log.Info("consul answers about this destination's intentions again: serving decisions", "destination", t.name)
	a.notify(t.name) // the native L7 sets are listed again
}

func (a *Authorizer) expireIdle(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, t := range a.destinations {
		if !t.pinned && now.UnixNano()-t.lastUsed.Load() > int64(a.cfg.DestinationIdle) {
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
func (a *Authorizer) defaultDecision(t *destination, id *Identity) (bool, Reason, error) {
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
