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

// An HTTP upstream's passive health check is counted here, not by
// HAProxy's observe layer7: an answer that retry-on retries on another
// instance (a 500-504 to an idempotent request, a failed connection) never
// reaches that count in HAProxy 2.6, because the retry is decided before
// the answer is observed, and those are exactly the failures the retries
// hide from callers. Every second the sidecar reads each such server's
// counters (show stat): its retried and 5xx answers are failures, its
// other answers successes. Failures with no success in between add up
// across sweeps (Envoy's "consecutive"; a sweep with both resets the count,
// their order being unknown); max_failures of them take the instance out
// (`set server health down`), unless max_ejection_percent of the
// upstream's instances (at least one) are down already. Its health checks
// then need rise = base_ejection_time passing checks to bring it back.
// Envoy ejects on the Nth consecutive failure at once; here it is within a
// second of it.
type outlierCounts struct {
	failures, ok int64
	streak       int64 // failures since the last success
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
		if u.PassiveHealth != nil && render.IsHTTP(u.Protocol) {
			watched[u.Backend()] = u.PassiveHealth
			// Envoy's outlier detection is per cluster: each chain
			// target's backend is judged on its own instances.
			for _, t := range u.Targets {
				watched[u.TargetBackend(t.ID)] = u.PassiveHealth
			}
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
	next, verdicts := judgeOutliers(watched, stats, a.outliers)
	a.outliers = next
	var cmds []haproxy.Command
	for _, v := range verdicts {
		h := watched[v.Backend]
		if !v.eject {
			a.log.Warn("upstream instance failing but not taken out: max_ejection_percent of the instances are down already",
				"backend", v.Backend, "server", v.Server, "consecutive_failures", v.streak, "max_ejection_percent", h.MaxEjectionPercent)
			continue
		}
		cmds = append(cmds, haproxy.SetServerHealth(v.Backend, v.Server, haproxy.HealthDown))
		a.log.Warn("upstream instance taken out by its passive health check", "backend", v.Backend, "server", v.Server,
			"consecutive_failures", v.streak, "max_failures", h.MaxFailures, "back_after_passing_checks", h.EjectSeconds)
	}
	if len(cmds) > 0 {
		if err := haproxy.NewAdmin(m.AdminSocket).Runtime(cmds...); err != nil {
			a.log.Error("passive health check: cannot take an instance out", "error", err)
		}
	}
}

// verdict is a server judged failing: taken out, or left in because of
// max_ejection_percent (said once, when its count reaches max_failures).
type verdict struct {
	haproxy.ServerStat
	streak int64
	eject  bool
}

// judgeOutliers is one sweep's decisions from the servers' counters now
// and at the last sweep; it returns the counters to keep for the next.
func judgeOutliers(watched map[string]*render.PassiveHealth, stats []haproxy.ServerStat, last map[string]outlierCounts) (map[string]outlierCounts, []verdict) {
	// Instances in service (free slots are in maintenance) and down, by
	// backend, for max_ejection_percent.
	inService, down := map[string]int{}, map[string]int{}
	for _, st := range stats {
		if watched[st.Backend] == nil || strings.HasPrefix(st.Status, "MAINT") {
			continue
		}
		inService[st.Backend]++
		if strings.HasPrefix(st.Status, "DOWN") {
			down[st.Backend]++
		}
	}
	next := map[string]outlierCounts{}
	var verdicts []verdict
	for _, st := range stats {
		h := watched[st.Backend]
		if h == nil {
			continue
		}
		key := st.Backend + "/" + st.Server
		now := outlierCounts{failures: st.Retries + st.Responses5xx, ok: st.ResponsesOK}
		prev, seen := last[key]
		// Counters restart with a new worker (a reload): a new baseline.
		if !seen || now.failures < prev.failures || now.ok < prev.ok {
			next[key] = now
			continue
		}
		if now.ok == prev.ok {
			now.streak = prev.streak + now.failures - prev.failures
		}
		if now.streak >= int64(h.MaxFailures) && strings.HasPrefix(st.Status, "UP") {
			if down[st.Backend] < max(1, inService[st.Backend]*h.MaxEjectionPercent/100) {
				down[st.Backend]++
				verdicts = append(verdicts, verdict{ServerStat: st, streak: now.streak, eject: true})
				now.streak = 0
			} else if prev.streak < int64(h.MaxFailures) {
				verdicts = append(verdicts, verdict{ServerStat: st, streak: now.streak})
			}
		}
		next[key] = now
	}
	return next, verdicts
}
