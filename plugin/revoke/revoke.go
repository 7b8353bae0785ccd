// Package revoke closes the open connections of callers that the
// intentions no longer allow.
//
// An HTTP listener re-checks each keep-alive connection once its decision's
// ttl has passed, but a stream is authorized once, when it opens: a TCP
// listener's connection (a database session, a tunnel), or an HTTP
// listener's upgraded stream (a 101: a WebSocket, which no HTTP rule sees
// after the upgrade). For those, HAProxy records every authorized stream in
// a stick table keyed by "<client address>:<port>|<caller SPIFFE ID>"
// (tracked, so the entry lives as long as the stream). When the authorizer
// reports a change for the destination, the Revoker re-decides each caller
// that has streams open and shuts the denied callers' sessions down through
// the runtime API.
//
// A stream the table cannot track whole (its key too long, or the table
// full) could never be revoked, so HAProxy refuses it and counts it by
// reason in a second table; the Revoker reports that count as
// haconnect_untracked_connections_total.
package revoke

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/spoa/authz"
)

// Runtime sends one command to HAProxy's runtime API and returns its
// answer; the Revoker speaks it through haproxy.CLI.
type Runtime = haproxy.Commander

// Checker re-decides a caller by its SPIFFE ID (nil: cannot tell now);
// *authz.Authorizer is one.
type Checker interface {
	Recheck(destination, spiffeID string) *authz.Decision
}

// Config configures a Revoker.
type Config struct {
	// Runtime is HAProxy's master CLI (preferred: every worker is swept
	// through it, including old workers that still hold connections opened
	// before a reload) or a worker's stats socket (that worker only). Which
	// one it is, is asked with ShowProc, which only the master answers.
	Runtime Runtime
	// Destination is the destination service the listener serves.
	Destination string
	// Table names the stick table of open streams, Frontends the
	// listeners that track into it, whose sessions may be shut down.
	Table     string
	Frontends []string
	// Untracked, if set, names the table counting (gpc0, by reason) the
	// streams refused because Table could not track them. Run reads it
	// every UntrackedEvery (default 10s) to log new refusals; a scrape
	// reads it too.
	Untracked      string
	UntrackedEvery time.Duration
	// Settle is when a second sweep follows the first (default 500ms): a
	// connection authorized just before the change may enter the table
	// just after the first sweep read it.
	Settle     time.Duration
	Logger     hclog.Logger
	Registerer prometheus.Registerer
}

// Revoker sweeps on demand; see the package documentation.
type Revoker struct {
	cfg    Config
	kick   chan struct{}
	closed *prometheus.CounterVec
	// reached: HAProxy has answered once. Until then a socket that is
	// absent or refuses means HAProxy has not started, so no connection
	// is open; that is not worth a warning (Run's goroutine only).
	reached   bool
	untracked untrackedLog
}

// New creates a Revoker; call Run to start it. It takes no Checker, so
// that it can exist before the authorizer whose OnChange it receives.
func New(cfg Config) (*Revoker, error) {
	if cfg.Runtime == nil || cfg.Destination == "" || cfg.Table == "" || len(cfg.Frontends) == 0 || slices.Contains(cfg.Frontends, "") {
		return nil, fmt.Errorf("revoke: runtime, destination, table and frontends are required")
	}
	if cfg.Settle <= 0 {
		cfg.Settle = 500 * time.Millisecond
	}
	if cfg.UntrackedEvery <= 0 {
		cfg.UntrackedEvery = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	r := &Revoker{
		cfg:  cfg,
		kick: make(chan struct{}, 1),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Name: "revoked_connections_total",
			Help: "Open connections shut down because the intentions no longer allow their caller, by reason.",
		}, []string{"reason"}),
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(r.closed); err != nil {
			return nil, err
		}
		if cfg.Untracked != "" {
			if err := cfg.Registerer.Register(untrackedCollector{r: r}); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// Changed asks for a sweep; it never blocks (authz.Config.OnChange). A
// change reported before Run starts is swept when it does.
func (r *Revoker) Changed(destination string) {
	if destination != r.cfg.Destination {
		return
	}
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Run sweeps after each change, and once more Settle later, until ctx is
// done, re-deciding callers with c.
func (r *Revoker) Run(ctx context.Context, c Checker) {
	settle := time.NewTimer(r.cfg.Settle)
	settle.Stop()
	defer settle.Stop()
	var untracked <-chan time.Time // refusals are logged even when nobody scrapes
	if r.cfg.Untracked != "" {
		tick := time.NewTicker(r.cfg.UntrackedEvery)
		defer tick.Stop()
		untracked = tick.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
			r.sweepAndLog(c)
			settle.Reset(r.cfg.Settle)
		case <-settle.C:
			r.sweepAndLog(c)
		case <-untracked:
			r.readUntracked()
		}
	}
}

func (r *Revoker) sweepAndLog(c Checker) {
	_, err := r.Sweep(c)
	switch {
	case err == nil:
		r.reached = true
	case !r.reached && notStarted(err):
		r.cfg.Logger.Debug("HAProxy's runtime API does not answer yet: no open connection to check", "error", err)
	default:
		r.reached = true
		r.cfg.Logger.Warn("cannot check open connections against the new intentions", "error", err)
	}
}

// notStarted reports whether err says nothing listens on the socket yet.
func notStarted(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED)
}

// Sweep shuts down the sessions of every caller that c now denies and
// returns how many it closed.
func (r *Revoker) Sweep(c Checker) (int, error) {
	workers, err := r.workers()
	if err != nil {
		return 0, err
	}
	verdicts := map[string]*authz.Decision{} // by caller, shared by the workers
	closed := 0
	for _, w := range workers {
		n, err := r.sweepWorker(w, c, verdicts)
		closed += n
		if err != nil {
			return closed, err
		}
	}
	return closed, nil
}

// workers are the runtime APIs to sweep: through a master CLI, every
// worker it lists (current and old); a worker's stats socket, which does
// not list processes, is swept alone.
func (r *Revoker) workers() ([]haproxy.CLI, error) {
	rt := haproxy.CLI{Commander: r.cfg.Runtime}
	procs, err := rt.ShowProc()
	if errors.Is(err, haproxy.ErrNotMaster) {
		return []haproxy.CLI{rt}, nil
	}
	if err != nil {
		return nil, err
	}
	var ws []haproxy.CLI
	for _, p := range procs {
		if p.Type == "worker" {
			ws = append(ws, rt.Worker(p.PID))
		}
	}
	if len(ws) == 0 {
		return []haproxy.CLI{rt}, nil
	}
	return ws, nil
}

func (r *Revoker) sweepWorker(rt haproxy.CLI, c Checker, verdicts map[string]*authz.Decision) (int, error) {
	entries, err := rt.ShowTable(r.cfg.Table)
	if errors.Is(err, haproxy.ErrNoSuchTable) {
		return 0, nil // a configuration from before upgrades were tracked: an HTTP listener without the table
	}
	if err != nil {
		return 0, err
	}
	byCaller := openConnections(entries)
	denied := map[string]authz.Reason{} // client address -> why
	for spiffe, addrs := range byCaller {
		d, seen := verdicts[spiffe]
		if !seen {
			d = c.Recheck(r.cfg.Destination, spiffe)
			verdicts[spiffe] = d
		}
		if d == nil {
			continue
		}
		reason := d.Reason
		switch {
		case !d.Allow:
		case d.L7 != nil:
			// HTTP permissions cannot be checked on a TCP stream, nor on
			// an upgraded one (no request passes on it any more): closed,
			// and a caller allowed again is checked on its next upgrade.
			reason = authz.ReasonL7NotHTTP
		default:
			continue
		}
		for _, a := range addrs {
			denied[a] = reason
		}
		r.cfg.Logger.Info("closing the open connections of a caller the intentions no longer allow",
			"destination", r.cfg.Destination, "spiffe", spiffe, "reason", reason.String(), "connections", len(addrs))
	}
	if len(denied) == 0 {
		return 0, nil
	}
	sessions, err := rt.ShowSessions()
	if err != nil {
		return 0, err
	}
	closed := 0
	for _, s := range sessions {
		reason, ok := denied[s.Src]
		if !ok || !slices.Contains(r.cfg.Frontends, s.Frontend) {
			continue
		}
		shut, err := rt.ShutdownSession(s.ID)
		if err != nil {
			return closed, err
		}
		if !shut { // the session ended meanwhile
			continue
		}
		r.closed.WithLabelValues(reason.String()).Inc()
		closed++
	}
	return closed, nil
}

// openConnections are the client addresses of the live streams (use > 0)
// of each caller, from the entries of the table of open streams, keyed
// "<client address>:<port>|<caller SPIFFE ID>".
func openConnections(entries []haproxy.TableEntry) map[string][]string {
	byCaller := map[string][]string{}
	for _, e := range entries {
		if e.Key == "" || e.Use <= 0 {
			continue
		}
		addr, spiffe, ok := strings.Cut(e.Key, "|")
		if !ok || spiffe == "" {
			continue
		}
		byCaller[spiffe] = append(byCaller[spiffe], addr)
	}
	return byCaller
}
