package sidecar

import (
	"strings"
	"time"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

// outlierSweep is how often the passive health check reads HAProxy's
// counters.
const outlierSweep = time.Second

// An upstream's passive health check has two halves. HAProxy's own
// (observe layer7 error-limit on-error mark-down, rendered) counts the
// errors that reach the caller. But an answer that retry-on retries on
// another instance (a 500-504 to an idempotent request, a failed
// connection) never reaches that count in HAProxy 2.6: the retry is
// decided before the answer is observed. Those are the failures the
// retries hide from callers, and they must still take the instance out, as
// Envoy's outlier detection counts every 5xx. So every second the sidecar
// reads each such server's counters: an instance that had at least
// max_failures retried or 5xx answers, and no other answer, since the last
// sweep is marked down (`set server health down`); its health checks then
// need rise = base_ejection_time passing checks to bring it back, as the
// native half does. Envoy ejects on the Nth consecutive failure at once;
// here it is within a second of it, and "consecutive" is read as "no
// success in between, within the second".
type outlierCounts struct {
	failures, ok int64
}

// sweepOutliers runs one sweep (apply loop only: it reads the applied
// model).
func (a *applier) sweepOutliers() {
	m := a.applied.model
	if a.proc == nil || m == nil {
		return
	}
	watched := map[string]*render.PassiveHealth{}
	for _, u := range m.Upstreams {
		if u.PassiveHealth != nil {
			watched[u.Backend()] = u.PassiveHealth
		}
	}
	if len(watched) == 0 {
		a.outliers = nil
		return
	}
	stats, err := haproxy.NewAdmin(m.AdminSocket).ShowServerStats()
	if err != nil {
		a.log.Debug("passive health check: cannot read HAProxy's counters", "error", err)
		return
	}
	last := a.outliers
	a.outliers = map[string]outlierCounts{}
	var cmds []haproxy.Command
	for _, st := range stats {
		h := watched[st.Backend]
		if h == nil {
			continue
		}
		key := st.Backend + "/" + st.Server
		now := outlierCounts{failures: st.Retries + st.Responses5xx, ok: st.ResponsesOK}
		a.outliers[key] = now
		prev, seen := last[key]
		// Counters restart with a new worker (a reload): a new baseline.
		if !seen || now.failures < prev.failures || now.ok < prev.ok {
			continue
		}
		failed, ok := now.failures-prev.failures, now.ok-prev.ok
		if failed >= int64(h.MaxFailures) && ok == 0 && strings.HasPrefix(st.Status, "UP") {
			cmds = append(cmds, haproxy.SetServerHealth(st.Backend, st.Server, haproxy.HealthDown))
			a.log.Warn("upstream instance taken out by its passive health check", "backend", st.Backend, "server", st.Server,
				"failures", failed, "max_failures", h.MaxFailures, "back_after_passing_checks", h.EjectSeconds)
		}
	}
	if len(cmds) > 0 {
		if err := haproxy.NewAdmin(m.AdminSocket).Runtime(cmds...); err != nil {
			a.log.Error("passive health check: cannot take an instance out", "error", err)
		}
	}
}
