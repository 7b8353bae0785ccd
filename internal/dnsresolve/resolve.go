// Package dnsresolve keeps host names resolved in the background, for
// configurations that need IP addresses (HAProxy's upstream slots, changed
// through the runtime API). Callers say which names they want and read the
// last answer without waiting; a change of any answer is reported once.
//
// Resolution is Go's (net.Resolver): it honours /etc/hosts and, with the
// system resolver, nsswitch, which HAProxy's own `resolvers` do not. It
// gives no TTLs, so every name is looked up again on an interval (5s by
// default, Envoy's STRICT_DNS dns_refresh_rate).
package dnsresolve

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Lookuper looks a host name up; *net.Resolver is one.
type Lookuper interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Defaults of Config.
const (
	DefaultInterval = 5 * time.Second
	DefaultTimeout  = 2 * time.Second
	DefaultMaxAddrs = 8
)

// Config configures a Resolver.
type Config struct {
	// Lookuper resolves (default net.DefaultResolver: the system's).
	Lookuper Lookuper
	// Interval between two lookups of a name (default 5s).
	Interval time.Duration
	// Timeout bounds one lookup (default 2s).
	Timeout time.Duration
	// MaxAddrs bounds the addresses kept for one name (default 8): each
	// becomes an HAProxy server, and a name with hundreds of records must
	// not make hundreds of them.
	MaxAddrs int
	// OnChange is called (from the resolver's goroutine, with no lock
	// held) after any name's addresses changed.
	OnChange func()
	Logger   hclog.Logger
}

// NetResolver returns a Go resolver that sends every query to server
// (host:port), e.g. Consul's DNS interface on 127.0.0.1:8600, instead of
// the nameservers of /etc/resolv.conf. /etc/hosts is still read first.
func NetResolver(server string) (*net.Resolver, error) {
	if _, _, err := net.SplitHostPort(server); err != nil {
		return nil, err
	}
	var d net.Dialer
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return d.DialContext(ctx, network, server)
	}}, nil
}

// Resolver keeps the wanted names resolved. Create it with New, start Run.
type Resolver struct {
	cfg  Config
	kick chan struct{}

	mu    sync.Mutex
	names map[string]*entry
}

// entry is what is known of one name.
type entry struct {
	addrs    []string // sorted; nil: none (yet)
	answered bool     // a lookup has given an answer (addresses or "no such host")
	failing  bool     // the last lookup failed; logged once per failing run
	capped   bool     // logged that the answer was cut to MaxAddrs
	next     time.Time
}

// New creates a Resolver.
func New(cfg Config) *Resolver {
	if cfg.Lookuper == nil {
		cfg.Lookuper = net.DefaultResolver
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.MaxAddrs <= 0 {
		cfg.MaxAddrs = DefaultMaxAddrs
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.OnChange == nil {
		cfg.OnChange = func() {}
	}
	return &Resolver{cfg: cfg, kick: make(chan struct{}, 1), names: map[string]*entry{}}
}

// IsName reports whether host needs resolving (it is not an IP address).
func IsName(host string) bool {
	_, err := netip.ParseAddr(host)
	return err != nil && host != ""
}

// Want makes names the set kept resolved: a new one is looked up at once
// (in the background), one no longer named is forgotten. It never waits.
func (r *Resolver) Want(names []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	keep := map[string]bool{}
	added := false
	for _, n := range names {
		keep[n] = true
		if _, ok := r.names[n]; !ok {
			r.names[n] = &entry{}
			added = true
		}
	}
	for n := range r.names {
		if !keep[n] {
			delete(r.names, n)
		}
	}
	if added {
		select {
		case r.kick <- struct{}{}:
		default:
		}
	}
}

// Addrs is the last answer for name: its addresses (IPv4 if it has any,
// else IPv6; sorted; at most MaxAddrs) and whether an answer came at all.
// A name whose lookups fail keeps its last addresses; a name DNS says does
// not exist has none. The slice must not be changed.
func (r *Resolver) Addrs(name string) ([]string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.names[name]
	if !ok {
		return nil, false
	}
	return e.addrs, e.answered
}

// lookupsAtOnce bounds the lookups in flight.
const lookupsAtOnce = 8

// Run looks the wanted names up until ctx is done: each every Interval, a
// new one at once, each lookup bounded by Timeout.
func (r *Resolver) Run(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		case <-t.C:
		}
		// Lookups run side by side (at most lookupsAtOnce), so that a
		// name whose nameserver does not answer delays no other.
		var (
			wg      sync.WaitGroup
			changed atomic.Bool
			sem     = make(chan struct{}, lookupsAtOnce)
		)
		for _, name := range r.due(time.Now()) {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if r.lookup(ctx, name) {
					changed.Store(true)
				}
			})
		}
		wg.Wait()
		if ctx.Err() != nil {
			return
		}
		if changed.Load() {
			r.cfg.OnChange()
		}
		t.Reset(r.untilNext(time.Now()))
	}
}

// due are the names whose lookup is due at now, sorted.
func (r *Resolver) due(now time.Time) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	for n, e := range r.names {
		if !e.next.After(now) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

func (r *Resolver) untilNext(now time.Time) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.cfg.Interval
	for _, e := range r.names {
		if w := e.next.Sub(now); w < d {
			d = max(w, time.Millisecond)
		}
	}
	return d
}

// lookup resolves name once and records the answer; it reports whether
// the name's addresses changed.
func (r *Resolver) lookup(ctx context.Context, name string) bool {
	lctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	ips, err := r.cfg.Lookuper.LookupNetIP(lctx, "ip", name)
	cancel()
	if ctx.Err() != nil {
		return false
	}
	var dnsErr *net.DNSError
	notFound := err != nil && errors.As(err, &dnsErr) && dnsErr.IsNotFound
	addrs, total := pick(ips, r.cfg.MaxAddrs)

	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.names[name]
	if !ok {
		return false // no longer wanted
	}
	e.next = time.Now().Add(r.cfg.Interval)
	old := e.addrs
	switch {
	case err == nil:
		if e.failing {
			r.cfg.Logger.Info("host name resolves again", "name", name, "addresses", addrs)
		}
		e.failing, e.answered, e.addrs = false, true, addrs
		if total > len(addrs) && !e.capped {
			e.capped = true
			r.cfg.Logger.Warn("host name has more addresses than are used: keeping the first ones (sorted)",
				"name", name, "addresses", total, "used", len(addrs))
		}
	case notFound:
		// DNS answered: the name has no address (NXDOMAIN or no
		// records). Its instances have none either; DNS is the authority.
		if !e.failing {
			r.cfg.Logger.Warn("host name does not resolve: no server for it until it does (looked up again every interval)",
				"name", name, "interval", r.cfg.Interval, "error", err)
		}
		e.failing, e.answered, e.addrs = true, true, nil
	default:
		// No answer (a timeout, SERVFAIL, no nameserver): keep the last
		// addresses, as Envoy keeps a DNS cluster's hosts when a
		// resolution fails.
		if !e.failing {
			r.cfg.Logger.Warn("host name lookup failing: keeping its last addresses and retrying every interval",
				"name", name, "addresses", e.addrs, "interval", r.cfg.Interval, "error", err)
		}
		e.failing = true
	}
	return !equal(old, e.addrs)
}

// pick keeps the IPv4 addresses if there are any, else the IPv6 ones
// (Consul configures Envoy's DNS clusters for IPv4 only; an IPv6-only name
// still works here), sorted and deduplicated, at most limit of them. It
// also returns how many there were before the cut.
func pick(ips []netip.Addr, limit int) ([]string, int) {
	var v4, v6 []netip.Addr
	for _, ip := range ips {
		ip = ip.Unmap()
		if ip.Is4() {
			v4 = append(v4, ip)
		} else if ip.IsValid() {
			v6 = append(v6, ip.WithZone(""))
		}
	}
	use := v4
	if len(use) == 0 {
		use = v6
	}
	sort.Slice(use, func(i, j int) bool { return use[i].Less(use[j]) })
	var out []string
	for i, ip := range use {
		if i > 0 && ip == use[i-1] {
			continue
		}
		out = append(out, ip.String())
	}
	total := len(out)
	if len(out) > limit {
		out = out[:limit]
	}
	return out, total
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
