// Package authz decides whether a caller, identified by its client
// certificate, may connect to a destination service, from Consul intentions.
//
// Decisions follow /v1/agent/connect/authorize exactly: the intentions that
// match the destination, in Consul's precedence order (as returned by
// /v1/connect/intentions/match), are walked and the first whose source matches
// the caller decides; with no match the ACL default policy decides (learned
// from the agent's authorize endpoint, the only place that reports it). Two
// checks the agent endpoint does not make are added: the certificate must
// carry exactly one Consul service SPIFFE ID, and its trust domain must be the
// cluster's (from the CA roots).
//
// Decisions are cached per destination and certificate. Each destination's
// intentions are kept current by a blocking query; a change re-evaluates the
// cache at once, so a new connection sees it within the time Consul takes to
// answer the blocking query. Evaluating locally rather than calling the agent
// on a miss also avoids caching an answer from the agent's own intention
// cache while it still lags behind a change.
//
// When Consul cannot be reached, cached decisions keep being served for
// Config.StaleWindow after the last successful contact; anything not cached,
// and everything past the window, is denied.
package authz

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/haconnect/haconnect/internal/backoff"
	"github.com/haconnect/haconnect/internal/consulflags"
)

// Config configures an Authorizer.
type Config struct {
	// Consul is the agent's client configuration (api.DefaultConfig() reads
	// CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...).
	Consul *api.Config
	Logger hclog.Logger
	// Metrics may be nil.
	Metrics *Metrics
	// StaleWindow is how long cached decisions are served while Consul is
	// unreachable (default 5m).
	StaleWindow time.Duration
	// MaxTargets bounds the destinations one authorizer watches (default 64).
	MaxTargets int
	// MaxEntries bounds the cached decisions per destination (default 10000).
	MaxEntries int
	// WaitTime is the blocking queries' wait (default 60s, at most a
	// quarter of StaleWindow).
	WaitTime time.Duration
	// StartTimeout is how long a request for a destination seen for the
	// first time waits for its intentions (default 2s).
	StartTimeout time.Duration
	// DefaultPolicyTTL is how long the learned ACL default policy is reused
	// before it is asked again (default 1m).
	DefaultPolicyTTL time.Duration
	// CallTimeout bounds non-blocking Consul calls (default 2s).
	CallTimeout time.Duration
	// OnChange, if set, is called (from a watch goroutine: it must not
	// block) after the rules of a destination changed and the cache was
	// re-evaluated, and when Consul has been unreachable past the stale
	// window. Holders of open connections use it to Recheck their callers.
	OnChange func(target string)
}

func (c *Config) setDefaults() {
	if c.Consul == nil {
		c.Consul = api.DefaultConfig()
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	if c.StaleWindow <= 0 {
		c.StaleWindow = 5 * time.Minute
	}
	if c.MaxTargets <= 0 {
		c.MaxTargets = 64
	}
	if c.MaxEntries <= 0 {
		c.MaxEntries = 10000
	}
	if c.WaitTime <= 0 {
		c.WaitTime = 60 * time.Second
	}
	// Consul answers a blocking query at the latest after WaitTime, and the
	// stale window counts from its last answer: keep several answers inside
	// one window.
	c.WaitTime = min(c.WaitTime, max(c.StaleWindow/4, time.Second))
	if c.StartTimeout <= 0 {
		c.StartTimeout = 2 * time.Second
	}
	if c.DefaultPolicyTTL <= 0 {
		c.DefaultPolicyTTL = time.Minute
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = 2 * time.Second
	}
}

// Authorizer makes and caches decisions. Create it with New and start its
// watches with Start.
type Authorizer struct {
	cfg   Config
	log   hclog.Logger
	watch *api.Client // blocking queries, bounded by contexts
	call  *api.Client // one-shot calls, bounded by CallTimeout

	ctx context.Context

	consul      consulState
	roots       health
	trustDomain atomic.Pointer[string]

	mu      sync.RWMutex
	targets map[string]*target
}

// target is the state kept for one destination service.
type target struct {
	name   string
	health health // the intentions watch
	chain  health // the protocol watch

	mu      sync.RWMutex
	gen     uint64            // bumped on every change of rules
	rules   *ruleSet          // never nil; replaced, not modified
	entries map[string]*entry // by certificate DER

	defaultPolicy atomic.Pointer[defaultPolicy]
	policyErr     atomic.Pointer[string] // the last error learning it, logged once
}

// ruleSet is what decides for one destination.
type ruleSet struct {
	intentions []*api.Intention // precedence order, as Consul returns them
	perms      []*Permissions   // compiled with intentions, by intention; nil for L4 intentions
	// protocol is the destination's protocol from its discovery chain
	// (service-defaults, then proxy-defaults, then tcp).
	protocol string
}

type entry struct {
	id       Identity
	gen      uint64
	decision *Decision
}

type defaultPolicy struct {
	allow   bool
	learned time.Time
}

// health tracks one blocking query.
type health struct {
	loaded  chan struct{} // closed after the first successful answer
	once    sync.Once
	failing atomic.Bool // the last attempt failed
}

func newHealth() health { return health{loaded: make(chan struct{})} }

func (h *health) isLoaded() bool {
	select {
	case <-h.loaded:
		return true
	default:
		return false
	}
}

// consulState is what the hot path needs to know about Consul: whether any
// watch is failing, and when Consul last answered any of them.
type consulState struct {
	failing     atomic.Int32
	lastContact atomic.Int64 // unix nanoseconds
}

// reachable reports whether every watch's last attempt succeeded.
func (c *consulState) reachable() bool { return c.failing.Load() == 0 }

// fresh reports whether cached decisions may still be served: Consul is
// reachable, or answered within window.
func (c *consulState) fresh(now time.Time, window time.Duration) bool {
	if c.reachable() {
		return true
	}
	last := c.lastContact.Load()
	return last != 0 && now.UnixNano()-last <= int64(window)
}

// New checks the configuration and creates an Authorizer.
func New(cfg Config) (*Authorizer, error) {
	cfg.setDefaults()
	watch, err := api.NewClient(cfg.Consul)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	callCfg := *cfg.Consul
	hc, err := api.NewHttpClient(callCfg.Transport, callCfg.TLSConfig)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	hc.Timeout = cfg.CallTimeout
	callCfg.HttpClient = hc
	call, err := api.NewClient(&callCfg)
	if err != nil {
		return nil, fmt.Errorf("consul client: %w", err)
	}
	return &Authorizer{
		cfg:     cfg,
		log:     cfg.Logger,
		watch:   watch,
		call:    call,
		roots:   newHealth(),
		targets: map[string]*target{},
	}, nil
}

// Start begins watching the CA roots and the given destinations; watches
// stop when ctx is done. Destinations seen later in requests are watched from
// their first request on.
func (a *Authorizer) Start(ctx context.Context, targets ...string) {
	a.ctx = ctx
	go a.loop(ctx, queryRoots, "CA roots", "/v1/agent/connect/ca/roots", &a.roots, a.queryRoots)
	for _, t := range targets {
		a.target(t)
	}
}

// Ready blocks until the CA roots and the given destinations' intentions are
// loaded, or ctx is done.
func (a *Authorizer) Ready(ctx context.Context, targets ...string) error {
	wait := []<-chan struct{}{a.roots.loaded}
	for _, name := range targets {
		t := a.target(name)
		if t == nil {
			return fmt.Errorf("too many destinations")
		}
		wait = append(wait, t.health.loaded)
	}
	for _, ch := range wait {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Decide answers whether the holder of the DER certificate may reach target.
// It never blocks on Consul for a cached caller.
func (a *Authorizer) Decide(targetName string, der []byte) *Decision {
	start := time.Now()
	d := a.decide(targetName, der, start)
	a.cfg.Metrics.observe(d, start)
	return d
}

func (a *Authorizer) decide(name string, der []byte, now time.Time) *Decision {
	if len(der) == 0 {
		return Deny(ReasonNoCertificate)
	}
	if name == "" {
		return Deny(ReasonNoTarget)
	}
	t := a.target(name)
	if t == nil {
		return Deny(ReasonTooManyTargets)
	}
	fresh := a.consul.fresh(now, a.cfg.StaleWindow)

	t.mu.RLock()
	e := t.entries[string(der)]
	hit := e != nil && e.gen == t.gen && now.Before(e.id.NotAfter)
	var d *Decision
	if hit {
		d = e.decision
	}
	t.mu.RUnlock()
	a.cfg.Metrics.lookup(hit)
	if hit {
		if !fresh {
			return Deny(ReasonConsulStale)
		}
		return d
	}
	return a.miss(t, der)
}

// miss decides for a caller that is not cached. It needs a healthy Consul.
func (a *Authorizer) miss(t *target, der []byte) *Decision {
	if !a.waitLoaded(&a.roots) || !a.waitLoaded(&t.health) || !a.waitLoaded(&t.chain) {
		return Deny(ReasonConsulUnavailable)
	}
	if !a.consul.reachable() {
		return Deny(ReasonConsulUnavailable)
	}
	id, reason, err := ParseIdentity(der)
	if err != nil {
		a.log.Debug("denied: unusable client certificate", "target", t.name, "reason", reason.String(), "error", err)
		return Deny(reason)
	}
	t.mu.RLock()
	gen, rules := t.gen, t.rules
	t.mu.RUnlock()
	d, cacheable := a.evaluate(t, rules, &id)
	if d.Reason == ReasonTrustDomain {
		a.log.Warn("denied: certificate from a foreign trust domain", "target", t.name,
			"spiffe", id.ID.String(), "trust_domain", *a.trustDomain.Load())
	}
	if !cacheable {
		return d
	}
	t.mu.Lock()
	if t.gen == gen { // else an update raced us; the next request re-evaluates
		if len(t.entries) >= a.cfg.MaxEntries {
			for k := range t.entries { // evict an arbitrary entry
				delete(t.entries, k)
				break
			}
		}
		t.entries[string(der)] = &entry{id: id, gen: gen, decision: d}
	}
	t.mu.Unlock()
	return d
}

func (a *Authorizer) waitLoaded(h *health) bool {
	if h.isLoaded() {
		return true
	}
	timer := time.NewTimer(a.cfg.StartTimeout)
	defer timer.Stop()
	select {
	case <-h.loaded:
		return true
	case <-timer.C:
		return false
	}
}

// evaluate applies the intentions (in precedence order) to the caller: the
// first whose source matches decides, as in Consul's RBAC rules for Envoy
// (an intention with HTTP permissions hands the decision to each request).
// A caller from another trust domain is denied first: intention sources
// name services of this cluster only. The boolean says whether the
// decision is final: it may be cached, or close an open connection.
func (a *Authorizer) evaluate(t *target, rules *ruleSet, id *Identity) (*Decision, bool) {
	if id.ID.TrustDomain().Name() != *a.trustDomain.Load() {
		return newDecision(false, ReasonTrustDomain, id), true
	}
	for i, ixn := range rules.intentions {
		if !sourceMatches(ixn, id) {
			continue
		}
		if len(ixn.Permissions) > 0 {
			return a.evaluateL7(t, rules, rules.perms[i], id)
		}
		if ixn.Action == api.IntentionActionAllow {
			return newDecision(true, ReasonIntentionAllow, id), true
		}
		return newDecision(false, ReasonIntentionDeny, id), true
	}
	allow, reason, err := a.defaultDecision(t, id)
	if err != nil {
		a.policyError(t, id, err)
		return newDecision(false, reason, id), false
	}
	if allow {
		return newDecision(true, ReasonDefaultAllow, id), true
	}
	return newDecision(false, ReasonDefaultDeny, id), true
}

// evaluateL7 admits a caller whose intention carries HTTP permissions; its
// requests are checked one by one. On a destination that does not speak
// HTTP the permissions cannot be checked: that is a misconfiguration, and
// the caller is denied, as Consul's own proxies deny it.
func (a *Authorizer) evaluateL7(t *target, rules *ruleSet, perms *Permissions, id *Identity) (*Decision, bool) {
	if !IsHTTP(rules.protocol) {
		return newDecision(false, ReasonL7NotHTTP, id), true
	}
	probe, ok := probeIdentity(rules.intentions, id)
	if !ok {
		a.policyError(t, id, errors.New("every probe identity matches an intention"))
		return newDecision(false, ReasonConsulInconsistent, id), false
	}
	allow, reason, err := a.defaultDecision(t, probe)
	if err != nil {
		a.policyError(t, id, err)
		return newDecision(false, reason, id), false
	}
	d := newDecision(true, ReasonL7Intention, id)
	d.L7, d.l7DefaultAllow = perms, allow
	return d, true
}

// policyError logs that a caller was denied because the default policy
// could not be learned: at Error the first time an error text is seen for
// the destination, then at Debug, so that a refused token does not log on
// every request.
func (a *Authorizer) policyError(t *target, id *Identity, err error) {
	text := err.Error()
	if prev := t.policyErr.Swap(&text); prev == nil || *prev != text {
		a.log.Error("denied: cannot learn the default intention policy", "target", t.name,
			"spiffe", id.ID.String(), "error", err)
		return
	}
	a.log.Debug("denied: cannot learn the default intention policy", "target", t.name,
		"spiffe", id.ID.String(), "error", err)
}

// probeIdentity returns an identity no intention matches, in the caller's
// trust domain and datacenter, to ask the agent for the default policy
// (which it reports only for callers no intention matches).
func probeIdentity(list []*api.Intention, id *Identity) (*Identity, bool) {
	for _, ns := range []string{"default", "haconnect-probe"} {
		path := fmt.Sprintf("/ns/%s/dc/%s/svc/haconnect-default-policy-probe", ns, id.Datacenter)
		sid, err := spiffeid.FromPath(id.ID.TrustDomain(), path)
		if err != nil {
			return nil, false
		}
		probe, err := serviceIdentity(sid)
		if err != nil {
			return nil, false
		}
		if !slices.ContainsFunc(list, func(ixn *api.Intention) bool { return sourceMatches(ixn, &probe) }) {
			return &probe, true
		}
	}
	return nil, false
}

// sourceMatches mirrors Consul's matching of an intention's source against a
// local caller.
func sourceMatches(ixn *api.Intention, id *Identity) bool {
	if ixn.SourcePeer != "" || ixn.SourceSamenessGroup != "" {
		return false // a peer's callers carry another trust domain
	}
	if ixn.SourceType != "" && ixn.SourceType != api.IntentionSourceConsul {
		return false
	}
	if orDefault(ixn.SourcePartition) != id.Partition {
		return false
	}
	if ns := orDefault(ixn.SourceNS); ns != "*" && ns != id.Namespace {
		return false
	}
	return ixn.SourceName == "*" || ixn.SourceName == id.Service
}

func orDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
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

// target returns the state for a destination, creating it and starting its
// watch the first time. It returns nil past MaxTargets.
func (a *Authorizer) target(name string) *target {
	a.mu.RLock()
	t := a.targets[name]
	a.mu.RUnlock()
	if t != nil {
		return t
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if t = a.targets[name]; t != nil {
		return t
	}
	if len(a.targets) >= a.cfg.MaxTargets {
		a.log.Warn("denied: too many destinations for one authorizer", "target", name, "max", a.cfg.MaxTargets)
		return nil
	}
	t = &target{name: name, health: newHealth(), chain: newHealth(), rules: &ruleSet{}, entries: map[string]*entry{}}
	a.targets[name] = t
	go a.loop(a.ctx, queryIntentions, "intentions for "+name, "/v1/connect/intentions/match?by=destination&name="+name, &t.health, func(ctx context.Context, index uint64) (uint64, error) {
		return a.queryIntentions(ctx, t, index)
	})
	go a.loop(a.ctx, queryChain, "protocol of "+name, "/v1/discovery-chain/"+name, &t.chain, func(ctx context.Context, index uint64) (uint64, error) {
		return a.queryProtocol(ctx, t, index)
	})
	return t
}

func (a *Authorizer) queryRoots(ctx context.Context, index uint64) (uint64, error) {
	roots, meta, err := a.watch.Agent().ConnectCARoots(a.blocking(ctx, index))
	if err != nil {
		return 0, err
	}
	if roots.TrustDomain == "" {
		return 0, errors.New("consul reports no trust domain (is Connect enabled?)")
	}
	if old := a.trustDomain.Load(); old == nil || *old != roots.TrustDomain {
		td := roots.TrustDomain
		a.trustDomain.Store(&td)
		a.log.Info("trust domain loaded", "trust_domain", td)
	}
	return meta.LastIndex, nil
}

func (a *Authorizer) queryIntentions(ctx context.Context, t *target, index uint64) (uint64, error) {
	res, meta, err := a.watch.Connect().IntentionMatch(&api.IntentionMatch{
		By:    api.IntentionMatchDestination,
		Names: []string{t.name},
	}, a.blocking(ctx, index))
	if err != nil {
		return 0, err
	}
	if meta.LastIndex != index || !t.health.isLoaded() {
		list := res[t.name]
		perms := make([]*Permissions, len(list))
		for i, ixn := range list {
			if len(ixn.Permissions) > 0 {
				perms[i] = compilePermissions(t.name, ixn, a.cfg.Metrics)
			}
		}
		a.update(t, "intentions", func(rs *ruleSet) { rs.intentions, rs.perms = list, perms })
	}
	return meta.LastIndex, nil
}

// queryProtocol watches the destination's protocol, which decides whether
// its L7 intentions can be enforced. The discovery chain resolves it as
// Consul's proxies do: service-defaults, then proxy-defaults, then tcp.
func (a *Authorizer) queryProtocol(ctx context.Context, t *target, index uint64) (uint64, error) {
	res, meta, err := a.watch.DiscoveryChain().Get(t.name, nil, a.blocking(ctx, index))
	if err != nil {
		return 0, err
	}
	protocol := "tcp"
	if res.Chain != nil && res.Chain.Protocol != "" {
		protocol = res.Chain.Protocol
	}
	t.mu.RLock()
	changed := t.rules.protocol != protocol
	t.mu.RUnlock()
	if changed || !t.chain.isLoaded() {
		a.update(t, "protocol", func(rs *ruleSet) { rs.protocol = protocol })
	}
	return meta.LastIndex, nil
}

func (a *Authorizer) blocking(ctx context.Context, index uint64) *api.QueryOptions {
	q := &api.QueryOptions{WaitIndex: index, WaitTime: a.cfg.WaitTime}
	return q.WithContext(ctx)
}

// Recheck decides again, against the current rules, for a caller known
// only by its SPIFFE ID: the caller of an open connection, whose decision
// was taken when it connected. It does not use the cache, which is keyed
// by certificate. It returns nil when it cannot tell now (the rules are not
// loaded yet, or Consul failed to answer within the stale window): an open
// connection is not cut for that.
func (a *Authorizer) Recheck(targetName, spiffeID string) *Decision {
	t := a.target(targetName)
	if t == nil {
		return nil
	}
	if !a.consul.fresh(time.Now(), a.cfg.StaleWindow) {
		return Deny(ReasonConsulStale)
	}
	if !t.health.isLoaded() || !t.chain.isLoaded() || !a.roots.isLoaded() {
		return nil
	}
	sid, err := spiffeid.FromString(spiffeID)
	if err != nil {
		return Deny(ReasonNotSPIFFE)
	}
	id, err := serviceIdentity(sid)
	if err != nil {
		return Deny(ReasonNotService)
	}
	t.mu.RLock()
	rules := t.rules
	t.mu.RUnlock()
	d, decided := a.evaluate(t, rules, &id)
	if !decided {
		return nil
	}
	return d
}

func (a *Authorizer) notify(target string) {
	if a.cfg.OnChange != nil {
		a.cfg.OnChange(target)
	}
}

func (a *Authorizer) notifyAll() {
	a.mu.RLock()
	names := make([]string, 0, len(a.targets))
	for name := range a.targets {
		names = append(names, name)
	}
	a.mu.RUnlock()
	for _, name := range names {
		a.notify(name)
	}
}

// update installs new rules (intentions or protocol, as change sets them)
// and re-evaluates the cached callers against them. Until an entry is
// re-evaluated its generation is old, so a request for it takes the miss
// path rather than an outdated answer.
func (a *Authorizer) update(t *target, what string, change func(*ruleSet)) {
	t.mu.Lock()
	rules := *t.rules
	change(&rules)
	misconfigured := 0
	if rules.protocol != "" && !IsHTTP(rules.protocol) { // "": not loaded yet
		for _, p := range rules.perms {
			if p != nil {
				misconfigured++
			}
		}
	}
	t.gen++
	gen := t.gen
	t.rules = &rules
	ids := make(map[string]Identity, len(t.entries))
	for k, e := range t.entries {
		ids[k] = e.id
	}
	t.mu.Unlock()
	a.cfg.Metrics.intentionUpdate()
	a.cfg.Metrics.setMisconfigured(t.name, misconfigured)
	if misconfigured > 0 {
		a.log.Warn("misconfiguration: intentions with HTTP permissions on a destination that does not speak HTTP; their callers are denied",
			"target", t.name, "protocol", rules.protocol, "intentions", misconfigured)
	}
	a.log.Debug("rules changed", "target", t.name, "change", what, "intentions", len(rules.intentions),
		"protocol", rules.protocol, "cached_callers", len(ids))

	fresh := make(map[string]*Decision, len(ids))
	for k, id := range ids {
		if d, ok := a.evaluate(t, &rules, &id); ok {
			fresh[k] = d
		}
	}
	t.mu.Lock()
	if t.gen == gen {
		for k, d := range fresh {
			if e := t.entries[k]; e != nil {
				t.entries[k] = &entry{id: e.id, gen: gen, decision: d}
			}
		}
	}
	t.mu.Unlock()
	a.notify(t.name)
}

// loop runs one blocking query for as long as ctx lives, tracking Consul's
// reachability and logging each change of state once. endpoint is what a
// refused token must be granted access to.
func (a *Authorizer) loop(ctx context.Context, query, what, endpoint string, h *health,
	fetch func(ctx context.Context, index uint64) (uint64, error)) {
	var index uint64
	retry := backoff.New(50*time.Millisecond, 2*time.Second)
	staleLogged := false
	for ctx.Err() == nil {
		qctx, cancel := context.WithTimeout(ctx, a.cfg.WaitTime+15*time.Second)
		next, err := fetch(qctx, index)
		cancel()
		if ctx.Err() != nil {
			return
		}
		now := time.Now()
		if err != nil {
			a.cfg.Metrics.consulError(query)
			if !h.failing.Swap(true) {
				a.consul.failing.Add(1)
				a.cfg.Metrics.setConsulUp(false)
				if _, refused := consulflags.Refused(err); refused {
					a.log.Error("consul refused the ACL token: serving cached decisions within the stale window, denying new callers",
						"watch", what, "stale_window", a.cfg.StaleWindow, "error", consulflags.Explain(err, "calling "+endpoint))
				} else {
					a.log.Warn("consul unreachable: serving cached decisions within the stale window, denying new callers",
						"watch", what, "stale_window", a.cfg.StaleWindow, "error", err)
				}
			}
			if !staleLogged && !a.consul.fresh(now, a.cfg.StaleWindow) {
				a.log.Error("consul unreachable past the stale window: denying every caller", "watch", what)
				staleLogged = true
				a.notifyAll()
			}
			index = 0
			retry.Wait(ctx) // a cancelled ctx ends the loop
			continue
		}
		a.consul.lastContact.Store(now.UnixNano())
		if h.failing.Swap(false) {
			a.consul.failing.Add(-1)
			a.log.Info("consul reachable again", "watch", what)
		}
		if a.consul.failing.Load() == 0 {
			a.cfg.Metrics.setConsulUp(true)
		}
		h.once.Do(func() { close(h.loaded) })
		staleLogged = false
		retry.Reset()
		if next < index { // the index went backwards (e.g. a snapshot restore): start over
			next = 0
		}
		index = next
	}
}
