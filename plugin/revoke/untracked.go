package revoke

import (
	"errors"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/plugin/haproxy"
)

// Reasons HAProxy gives for a stream it could not track (the keys of the
// Untracked table).
const (
	UntrackedKeyTooLong = "key_too_long" // longer than the table's key: it would be cut
	UntrackedTableFull  = "table_full"   // every entry is held by an open stream
)

var untrackedDesc = prometheus.NewDesc("haconnect_untracked_connections_total",
	"Streams refused because the table of open streams could not track them, so that they could not have been revoked, by reason (key_too_long, table_full). Summed over HAProxy's running workers: a worker that exits takes its count along.",
	[]string{"reason"}, nil)

// Untracked returns, by reason, how many streams HAProxy refused because
// it could not track them, summed over its workers.
func (r *Revoker) Untracked() (map[string]float64, error) {
	workers, err := r.workers()
	if err != nil {
		return nil, err
	}
	counts := map[string]float64{UntrackedKeyTooLong: 0, UntrackedTableFull: 0}
	for _, w := range workers {
		entries, err := w.ShowTable(r.cfg.Untracked)
		if errors.Is(err, haproxy.ErrNoSuchTable) {
			continue // a configuration from before untracked streams were counted
		}
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if n, err := strconv.ParseFloat(e.Data["gpc0"], 64); err == nil && e.Key != "" {
				counts[e.Key] += n
			}
		}
	}
	return counts, nil
}

// untrackedLog remembers the last counts read, to log what grew once.
type untrackedLog struct {
	mu   sync.Mutex
	seen map[string]float64
}

// readUntracked reads the counts and logs those that grew since the last
// read (by Run's periodic check or a scrape); nil when HAProxy does not
// answer.
func (r *Revoker) readUntracked() map[string]float64 {
	counts, err := r.Untracked()
	if err != nil {
		r.cfg.Logger.Debug("cannot read the count of untracked streams", "table", r.cfg.Untracked, "error", err)
		return nil
	}
	l := &r.untracked
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil {
		l.seen = map[string]float64{}
	}
	for reason, n := range counts {
		if n > l.seen[reason] {
			r.cfg.Logger.Warn("streams were refused because they could not be tracked for revocation",
				"destination", r.cfg.Destination, "reason", reason, "refused", n-l.seen[reason], "table", r.cfg.Table)
		}
		l.seen[reason] = n // lower after a worker left: counted from there
	}
	return counts
}

// untrackedCollector reads the counts when scraped.
type untrackedCollector struct{ r *Revoker }

func (c untrackedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- untrackedDesc }

func (c untrackedCollector) Collect(ch chan<- prometheus.Metric) {
	for reason, n := range c.r.readUntracked() {
		ch <- prometheus.MustNewConstMetric(untrackedDesc, prometheus.CounterValue, n, reason)
	}
}
