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

	"github.com/haconnect/haconnect/spoa/authz"
)

// Runtime sends one command to HAProxy's runtime API and returns its answer.
type Runtime interface {
	Command(c string) (string, error)
}

// Checker re-decides a caller by its SPIFFE ID (nil: cannot tell now);
// *authz.Authorizer is one.
type Checker interface {
	Recheck(target, spiffeID string) *authz.Decision
}

// Config configures a Revoker.
type Config struct {
	// Runtime is HAProxy's master CLI (preferred: every worker is swept
	// through it, including old workers that still hold connections opened
	// before a reload) or a worker's stats socket (that worker only). Which
	// one it is, is asked with "show proc", a master-only command.
	Runtime Runtime
	// Target is the destination service the listener serves.
	Target string
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
	if cfg.Runtime == nil || cfg.Target == "" || cfg.Table == "" || len(cfg.Frontends) == 0 || slices.Contains(cfg.Frontends, "") {
		return nil, fmt.Errorf("revoke: runtime, target, table and frontends are required")
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
func (r *Revoker) Changed(target string) {
	if target != r.cfg.Target {
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
// not know "show proc", is swept alone.
func (r *Revoker) workers() ([]Runtime, error) {
	out, err := r.cfg.Runtime.Command("show proc")
	if err != nil {
		return nil, err
	}
	var ws []Runtime
	for _, line := range strings.Split(out, "\n") {
		// 9554            worker          0               0d00h00m01s     2.6.12
		if f := strings.Fields(line); len(f) >= 2 && f[1] == "worker" {
			ws = append(ws, viaMaster{master: r.cfg.Runtime, pid: f[0]})
		}
	}
	if len(ws) == 0 {
		return []Runtime{r.cfg.Runtime}, nil
	}
	return ws, nil
}

// viaMaster sends commands to one worker through the master CLI.
type viaMaster struct {
	master Runtime
	pid    string
}

func (v viaMaster) Command(c string) (string, error) { return v.master.Command("@!" + v.pid + " " + c) }

func (r *Revoker) sweepWorker(rt Runtime, c Checker, verdicts map[string]*authz.Decision) (int, error) {
	out, err := rt.Command("show table " + r.cfg.Table)
	if err != nil {
		return 0, err
	}
	if strings.Contains(out, "No such table") {
		return 0, nil // a configuration from before upgrades were tracked: an HTTP listener without the table
	}
	byCaller := openConnections(out)
	denied := map[string]authz.Reason{} // client address -> why
	for spiffe, addrs := range byCaller {
		d, seen := verdicts[spiffe]
		if !seen {
			d = c.Recheck(r.cfg.Target, spiffe)
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
			"target", r.cfg.Target, "spiffe", spiffe, "reason", reason.String(), "connections", len(addrs))
	}
	if len(denied) == 0 {
		return 0, nil
	}
	sessions, err := rt.Command("show sess")
	if err != nil {
		return 0, err
	}
	closed := 0
	for _, s := range parseSessions(sessions) {
		reason, ok := denied[s.src]
		if !ok || !slices.Contains(r.cfg.Frontends, s.frontend) {
			continue
		}
		out, err := rt.Command("shutdown session " + s.id)
		if err != nil {
			return closed, err
		}
		if strings.TrimSpace(out) != "" { // the session ended meanwhile
			continue
		}
		r.closed.WithLabelValues(reason.String()).Inc()
		closed++
	}
	return closed, nil
}

// openConnections reads `show table` output: the client addresses of the
// live connections (use > 0) of each caller.
//
//	0x55e0f1a2b3c0: key=127.0.0.1:40312|spiffe://td/ns/default/dc/dc1/svc/web use=1 exp=0 shard=0
func openConnections(out string) map[string][]string {
	byCaller := map[string][]string{}
	for _, line := range strings.Split(out, "\n") {
		f := fields(line)
		key, use := f["key"], f["use"]
		if key == "" || use == "" || use == "0" {
			continue
		}
		addr, spiffe, ok := strings.Cut(key, "|")
		if !ok || spiffe == "" {
			continue
		}
		byCaller[spiffe] = append(byCaller[spiffe], addr)
	}
	return byCaller
}

type session struct{ id, src, frontend string }

// parseSessions reads `show sess` output.
//
//	0x55e0f1b4c000: proto=tcpv4 src=127.0.0.1:40312 fe=public_listener be=local_app srv=app ts=00 ...
func parseSessions(out string) []session {
	var list []session
	for _, line := range strings.Split(out, "\n") {
		id, _, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(id, "0x") {
			continue
		}
		f := fields(line)
		list = append(list, session{id: id, src: f["src"], frontend: f["fe"]})
	}
	return list
}

// fields splits "a=b c=d" into a map; words without "=" are skipped.
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, w := range strings.Fields(line) {
		if k, v, ok := strings.Cut(w, "="); ok {
			m[k] = v
		}
	}
	return m
}
