package revoke

import (
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
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
		out, err := w.Command("show table " + r.cfg.Untracked)
		if err != nil {
			return nil, err
		}
		// 0x55d0c2a1e3c8: key=table_full use=0 exp=0 gpc0=3
		for _, line := range strings.Split(out, "\n") {
			f := fields(line)
			if n, err := strconv.ParseFloat(f["gpc0"], 64); err == nil && f["key"] != "" {
				counts[f["key"]] += n
			}
		}
	}
	return counts, nil
}

// untrackedCollector reads the count when scraped, and logs when it grew.
type untrackedCollector struct {
	r    *Revoker
	mu   sync.Mutex
	seen map[string]float64
}

func (c *untrackedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- untrackedDesc }

func (c *untrackedCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.r.Untracked()
	if err != nil {
		c.r.cfg.Logger.Debug("cannot read the count of untracked streams", "table", c.r.cfg.Untracked, "error", err)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[string]float64{}
	}
	for reason, n := range counts {
		if n > c.seen[reason] {
			c.r.cfg.Logger.Warn("streams were refused because they could not be tracked for revocation",
				"target", c.r.cfg.Target, "reason", reason, "refused", n-c.seen[reason], "table", c.r.cfg.Table)
		}
		c.seen[reason] = n
		ch <- prometheus.MustNewConstMetric(untrackedDesc, prometheus.CounterValue, n, reason)
	}
}
