// Package authz decides whether a caller, identified by its client
// certificate, may connect to a destination service, from Consul intentions.
//
// Decisions follow /v1/agent/connect/authorize exactly: the intentions that
// match the destination, in Consul's precedence order (as returned by
// /v1/connect/intentions/match), are walked and the first whose source matches
// the caller decides; with no match the ACL default policy decides (learned
// from the agent's authorize endpoint, the only place that reports it). Checks
// the agent endpoint does not make are added: the certificate must chain to
// Consul's CA roots, be within its validity period, carry exactly one Consul
// service SPIFFE ID, and its trust domain must be the cluster's.
//
// The files of the package by job: authorizer.go is the public API and the
// decision cache; evaluate.go the pure evaluation of intentions; l7.go the
// HTTP permissions; watches.go the Consul watches and the freshness of what
// they hold; trust.go the CA roots; reason.go the decisions and why.
//
// Decisions are cached per destination and certificate. Each destination's
// intentions are kept current by a blocking query; a change re-evaluates the
// cache at once, so a new connection sees it within the time Consul takes to
// answer the blocking query. Evaluating locally rather than calling the agent
// on a miss also avoids caching an answer from the agent's own intention
// cache while it still lags behind a change.
//
// A decision is only as fresh as the intentions it came from. When Consul
// cannot answer for a destination (its servers are gone, or the token lost
// the right to read its intentions), that destination's cached decisions
// keep being served for Config.StaleWindow after Consul last answered
// about its intentions;
// new callers of it, and every caller past the window, are denied. Other
// destinations are not affected.
package authz

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/haconnect/haconnect/internal/consulwatch"
)

// Config configures an Authorizer.
type Config struct {
	// Consul is the agent's client configuration (api.DefaultConfig() reads
	// CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...).
	Consul *api.Config
	Logger hclog.Logger
	// Metrics may be nil.
	Metrics *Metrics
	// StaleWindow is how long a destination's cached decisions are served
	// while Consul does not answer for it (default 5m).
	StaleWindow time.Duration
	// MaxDestinations bounds the destinations one authorizer watches (default 64).
	MaxDestinations int
	// DestinationIdle is how long a destination nobody asks about is kept
	// (default 10m). Destinations given to Start are kept for good. When
	// MaxDestinations are watched, one idle for a tenth of this makes room.
	DestinationIdle time.Duration
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
	// Roots, if set, is a watch of the CA roots that this process already
	// runs (the sidecar's); the authorizer follows it instead of watching
	// them a second time. Nil: the authorizer watches them itself.
	Roots *consulwatch.Value[*api.CARootList]
	// OnChange, if set, is called (from a watch goroutine: it must not
	// block) after the rules of a destination changed and the cache was
	// re-evaluated, when Consul has not answered for a destination past the
	// stale window (and when it answers again), and again while a Recheck
	// of a destination could not decide. Holders of open connections use
	// it to Recheck their callers.
	OnChange func(destination string)
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
	if c.MaxDestinations <= 0 {
		c.MaxDestinations = 64
	}
	if c.DestinationIdle <= 0 {
		c.DestinationIdle = 10 * time.Minute
	}
	if c.MaxEntries <= 0 {
		c.MaxEntries = 10000
	}
	if c.WaitTime <= 0 {
		c.WaitTime = 60 * time.Second
	}
	// Consul answers a blocking query at the latest after WaitTime (plus a
	// sixteenth of jitter), and the stale window counts from its last
	// answer: keep several answers inside one window.
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

	roots    *consulwatch.Value[*api.CARootList]
	trust    atomic.Pointer[trust]
	failing  atomic.Int32 // watches whose last attempt failed, for consul_up
	rateLogs sync.Map     // log key -> *atomic.Int64, see logLimited

	mu           sync.RWMutex
	destinations map[string]*destination
}

// destination is the state kept for one destination service.
type destination struct {
	name       string
	pinned     bool               // given to Start: never expires; guarded by Authorizer.mu
	cancel     context.CancelFunc // stops its watches
	intentions *consulwatch.Status
	chain      *consulwatch.Status // the protocol watch
	lastUsed   atomic.Int64        // unix nanoseconds
	recheck    atomic.Bool         // a Recheck could not decide: notify again
	stale      bool                // past the stale window; owned by the janitor

	mu      sync.RWMutex
	gen     uint64            // bumped on every change of rules
	rules   *ruleSet          // never nil; replaced, not modified
	entries map[string]*entry // by certificate DER

	defaultPolicy atomic.Pointer[defaultPolicy]
	policyErr     atomic.Pointer[string] // the last error learning it, logged once
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
	roots := cfg.Roots
	if roots == nil {
		roots = consulwatch.NewValue[*api.CARootList]()
	}
	return &Authorizer{
		cfg:          cfg,
		log:          cfg.Logger,
		watch:        watch,
		call:         call,
		roots:        roots,
		destinations: map[string]*destination{},
	}, nil
}

// Start begins watching the CA roots and the given destinations, which are
// kept for good; watches stop when ctx is done. Destinations seen later in
// requests are watched from their first request on, until nobody asks
// about them for Config.DestinationIdle.
func (a *Authorizer) Start(ctx context.Context, destinations ...string) {
	a.ctx = ctx
	a.watchRoots(ctx)
	for _, name := range destinations {
		a.pin(name)
	}
	go a.janitor(ctx)
}

// Ready blocks until the CA roots and the given destinations' intentions are
// loaded, or ctx is done.
func (a *Authorizer) Ready(ctx context.Context, destinations ...string) error {
	wait := []<-chan struct{}{a.roots.Status.Loaded()}
	for _, name := range destinations {
		t := a.destination(name, time.Now())
		if t == nil {
			return fmt.Errorf("too many destinations")
		}
		wait = append(wait, t.intentions.Loaded(), t.chain.Loaded())
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

// Decide answers whether the holder of the DER certificate may reach destination.
// It never blocks on Consul for a cached caller.
func (a *Authorizer) Decide(destination string, der []byte) *Decision {
	start := time.Now()
	d := a.decide(destination, der, start)
	a.cfg.Metrics.observe(d, start)
	return d
}

func (a *Authorizer) decide(name string, der []byte, now time.Time) *Decision {
	if len(der) == 0 {
		return Deny(ReasonNoCertificate)
	}
	if name == "" {
		return Deny(ReasonNoDestination)
	}
	t := a.destination(name, now)
	if t == nil {
		return Deny(ReasonTooManyDestinations)
	}
	t.mu.RLock()
	e := t.entries[string(der)]
	hit := e != nil && e.gen == t.gen && e.id.validAt(now)
	var d *Decision
	if hit {
		d = e.decision
	}
	t.mu.RUnlock()
	a.cfg.Metrics.lookup(hit)
	if hit {
		if !a.fresh(t, now) {
			return Deny(ReasonConsulStale)
		}
		return d
	}
	return a.miss(t, der, now)
}

// miss decides for a caller that is not cached. It needs Consul to be
// answering for the destination.
func (a *Authorizer) miss(t *destination, der []byte, now time.Time) *Decision {
	if !a.waitLoaded(a.roots.Status) || !a.waitLoaded(t.intentions) || !a.waitLoaded(t.chain) {
		return Deny(ReasonConsulUnavailable)
	}
	if a.roots.Status.Failing() || t.intentions.Failing() || t.chain.Failing() {
		return Deny(ReasonConsulUnavailable)
	}
	cert, id, reason, err := parseCertificate(der)
	if err != nil {
		a.log.Debug("denied: unusable client certificate", "destination", t.name, "reason", reason.String(), "error", err)
		return Deny(reason)
	}
	// Nothing below is cached unless the certificate is genuine and valid,
	// so that forged or expired certificates cannot fill the cache.
	switch {
	case now.Before(id.NotBefore):
		a.logLimited("not-yet-valid|"+t.name, "denied: client certificate not valid yet", "destination", t.name,
			"spiffe", id.ID.String(), "not_before", id.NotBefore)
		return newDecision(false, ReasonCertificateNotYetValid, &id)
	case !now.Before(id.NotAfter):
		a.logLimited("expired|"+t.name, "denied: client certificate expired", "destination", t.name,
			"spiffe", id.ID.String(), "not_after", id.NotAfter)
		return newDecision(false, ReasonCertificateExpired, &id)
	}
	tr := a.trust.Load()
	if tr == nil { // the roots Consul gave were unusable
		return Deny(ReasonConsulUnavailable)
	}
	if id.ID.TrustDomain().Name() != tr.domain {
		a.logLimited("trust-domain|"+t.name, "denied: certificate from a foreign trust domain", "destination", t.name,
			"spiffe", id.ID.String(), "trust_domain", tr.domain)
		return newDecision(false, ReasonTrustDomain, &id)
	}
	if err := tr.verify(cert, now); err != nil {
		a.logLimited("untrusted|"+t.name, "denied: client certificate does not chain to Consul's CA roots", "destination", t.name,
			"spiffe", id.ID.String(), "error", err)
		return newDecision(false, ReasonUntrustedCertificate, &id)
	}
	t.mu.RLock()
	gen, rules := t.gen, t.rules
	t.mu.RUnlock()
	d, cacheable := a.evaluate(t, rules, &id)
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

func (a *Authorizer) waitLoaded(s *consulwatch.Status) bool {
	if s.IsLoaded() {
		return true
	}
	timer := time.NewTimer(a.cfg.StartTimeout)
	defer timer.Stop()
	select {
	case <-s.Loaded():
		return true
	case <-timer.C:
		return false
	}
}

// fresh reports whether t's cached decisions may be served at now: Consul
// answered about its intentions within the stale window. A decision is
// only as fresh as the intentions it came from; the agent keeps answering
// its cached CA roots (and the discovery chain changes rarely) when the
// servers are gone, so their answers say nothing about the intentions.
func (a *Authorizer) fresh(t *destination, now time.Time) bool {
	return t.intentions.Fresh(now, a.cfg.StaleWindow)
}

// evaluate decides for a caller against t's rules (see evaluate in
// evaluate.go) and logs why the default policy could not be learned.
func (a *Authorizer) evaluate(t *destination, rules *ruleSet, id *Identity) (*Decision, bool) {
	tr := a.trust.Load()
	if tr == nil { // the roots Consul gave were unusable
		return Deny(ReasonConsulUnavailable), false
	}
	d, final, err := evaluate(rules, tr.domain, id, func(caller *Identity) (bool, Reason, error) {
		return a.defaultDecision(t, caller)
	})
	if err != nil {
		a.policyError(t, id, err)
	}
	return d, final
}

// policyError logs that a caller was denied because the default policy
// could not be learned: at Error the first time an error text is seen for
// the destination, then at Debug, so that a refused token does not log on
// every request.
func (a *Authorizer) policyError(t *destination, id *Identity, err error) {
	text := err.Error()
	if prev := t.policyErr.Swap(&text); prev == nil || *prev != text {
		a.log.Error("denied: cannot learn the default intention policy", "destination", t.name,
			"spiffe", id.ID.String(), "error", err)
		return
	}
	a.log.Debug("denied: cannot learn the default intention policy", "destination", t.name,
		"spiffe", id.ID.String(), "error", err)
}

// logLimited logs a denial at Warn at most once every 10 seconds per key,
// and at Debug otherwise: a client sending bad certificates in a loop must
// not flood the log.
func (a *Authorizer) logLimited(key, msg string, args ...any) {
	v, _ := a.rateLogs.LoadOrStore(key, new(atomic.Int64))
	last := v.(*atomic.Int64)
	now := time.Now().UnixNano()
	if prev := last.Load(); now-prev >= int64(10*time.Second) && last.CompareAndSwap(prev, now) {
		a.log.Warn(msg, args...)
		return
	}
	a.log.Debug(msg, args...)
}

// Recheck decides again, against the current rules, for a caller known
// only by its SPIFFE ID: the caller of an open connection, whose decision
// was taken when it connected. It does not use the cache, which is keyed
// by certificate. It returns nil when it cannot tell now (the rules are not
// loaded yet, or the default policy cannot be learned); OnChange is then
// called again for the destination until it can. An open connection is not
// cut for a hiccup of Consul within the stale window, and is denied past it.
func (a *Authorizer) Recheck(destination, spiffeID string) *Decision {
	now := time.Now()
	t := a.destination(destination, now)
	if t == nil {
		return nil
	}
	if !t.intentions.IsLoaded() || !t.chain.IsLoaded() || !a.roots.Status.IsLoaded() {
		t.recheck.Store(true)
		return nil
	}
	if !a.fresh(t, now) {
		return Deny(ReasonConsulStale)
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
		t.recheck.Store(true)
		return nil
	}
	return d
}

func (a *Authorizer) notify(destination string) {
	if a.cfg.OnChange != nil {
		a.cfg.OnChange(destination)
	}
}

// update installs new rules (intentions or protocol, as change sets them)
// and re-evaluates the cached callers against them. Until an entry is
// re-evaluated its generation is old, so a request for it takes the miss
// path rather than an outdated answer.
func (a *Authorizer) update(t *destination, what string, change func(*ruleSet)) {
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
			"destination", t.name, "protocol", rules.protocol, "intentions", misconfigured)
	}
	a.log.Debug("rules changed", "destination", t.name, "change", what, "intentions", len(rules.intentions),
		"protocol", rules.protocol, "cached_callers", len(ids))

	if a.trust.Load() != nil {
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
	}
	a.notify(t.name)
}

// forgetCallers empties every destination's cache, when the CA roots
// change: a cached certificate may no longer chain to them.
func (a *Authorizer) forgetCallers() {
	for _, t := range a.snapshot() {
		t.mu.Lock()
		t.gen++
		clear(t.entries)
		t.mu.Unlock()
	}
}

// destination returns the state for a destination, creating it and starting its
// watches the first time, and records that it was asked about at now. It
// returns nil past MaxDestinations when no destination has been idle long enough
// to make room.
func (a *Authorizer) destination(name string, now time.Time) *destination {
	a.mu.RLock()
	t := a.destinations[name]
	a.mu.RUnlock()
	if t == nil {
		t = a.addDestination(name, now)
		if t == nil {
			return nil
		}
	}
	// Recorded at most once a second: the hot path should not write a
	// shared cache line on every request.
	if now.UnixNano()-t.lastUsed.Load() > int64(time.Second) {
		t.lastUsed.Store(now.UnixNano())
	}
	return t
}

func (a *Authorizer) addDestination(name string, now time.Time) *destination {
	a.mu.Lock()
	defer a.mu.Unlock()
	if t := a.destinations[name]; t != nil {
		return t
	}
	if len(a.destinations) >= a.cfg.MaxDestinations && !a.evictIdleLocked(now) {
		a.logLimited("too-many-targets", "denied: too many destinations for one authorizer", "destination", name, "max", a.cfg.MaxDestinations)
		return nil
	}
	ctx := a.ctx
	if ctx == nil { // not started: the watches start with Start
		ctx = context.Background()
	}
	ctx, cancel := context.WithCancel(ctx)
	t := &destination{
		name: name, cancel: cancel,
		intentions: consulwatch.NewStatus(), chain: consulwatch.NewStatus(),
		rules: &ruleSet{}, entries: map[string]*entry{},
	}
	t.lastUsed.Store(now.UnixNano())
	a.destinations[name] = t
	a.cfg.Metrics.setDestinations(len(a.destinations))
	a.watchDestination(ctx, t)
	return t
}

// pin watches a destination for good.
func (a *Authorizer) pin(name string) {
	if a.addDestination(name, time.Now()) == nil {
		return
	}
	a.mu.Lock()
	if t := a.destinations[name]; t != nil {
		t.pinned = true
	}
	a.mu.Unlock()
}

// evictIdleLocked drops the destination asked about least recently, if it
// is not pinned and has been idle for a tenth of DestinationIdle.
func (a *Authorizer) evictIdleLocked(now time.Time) bool {
	var oldest *destination
	for _, t := range a.destinations {
		if !t.pinned && (oldest == nil || t.lastUsed.Load() < oldest.lastUsed.Load()) {
			oldest = t
		}
	}
	if oldest == nil || now.UnixNano()-oldest.lastUsed.Load() < int64(a.cfg.DestinationIdle/10) {
		return false
	}
	a.dropLocked(oldest, "evicted to make room")
	return true
}

func (a *Authorizer) dropLocked(t *destination, why string) {
	delete(a.destinations, t.name)
	t.cancel()
	a.cfg.Metrics.setDestinations(len(a.destinations))
	a.cfg.Metrics.setMisconfigured(t.name, 0)
	a.log.Debug("destination no longer watched", "destination", t.name, "why", why)
}

// snapshot lists the destinations watched now.
func (a *Authorizer) snapshot() []*destination {
	a.mu.RLock()
	defer a.mu.RUnlock()
	out := make([]*destination, 0, len(a.destinations))
	for _, t := range a.destinations {
		out = append(out, t)
	}
	return out
}
