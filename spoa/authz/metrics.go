package authz

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the authorizer's Prometheus collectors. Every labelled child is
// resolved up front so that recording a decision allocates nothing.
type Metrics struct {
	decisions      [2][numReasons]prometheus.Counter // [allow][reason]
	cacheHits      prometheus.Counter
	cacheMisses    prometheus.Counter
	latency        prometheus.Histogram
	consulErrors   map[string]prometheus.Counter
	consulUp       prometheus.Gauge
	intentionLoads prometheus.Counter
	l7Requests     *prometheus.CounterVec
	misconfigured  *prometheus.GaugeVec
	destinations   prometheus.Gauge
	stale          *prometheus.GaugeVec
}

// Consul queries the authorizer makes, as they label consul_errors_total.
const (
	queryRoots      = "ca_roots"
	queryIntentions = "intention_match"
	queryAuthorize  = "authorize"
	queryChain      = "discovery_chain"
)

// NewMetrics creates the collectors and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	decisions := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "haconnect", Subsystem: "spoa", Name: "decisions_total",
		Help: "Authorization decisions by result (allow/deny) and reason.",
	}, []string{"result", "reason"})
	lookups := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "haconnect", Subsystem: "spoa", Name: "cache_lookups_total",
		Help: "Decision cache lookups by result (hit/miss).",
	}, []string{"result"})
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "haconnect", Subsystem: "spoa", Name: "consul_errors_total",
		Help: "Failed Consul requests by query.",
	}, []string{"query"})
	m := &Metrics{
		cacheHits:   lookups.WithLabelValues("hit"),
		cacheMisses: lookups.WithLabelValues("miss"),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "decision_duration_seconds",
			Help:    "Time to reach a decision, cache hits included.",
			Buckets: []float64{1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 5e-3, 2.5e-2, 0.1, 0.5},
		}),
		consulErrors: map[string]prometheus.Counter{},
		consulUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "consul_up",
			Help: "1 while every Consul watch of the authorizer is healthy, else 0.",
		}),
		intentionLoads: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "intention_updates_total",
			Help: "Intention changes applied to the decision cache.",
		}),
		l7Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "l7_requests_total",
			Help: "HTTP requests decided by an intention's permissions, by destination, intention source, " +
				"permission (1-based index, or none: the default policy decided) and result.",
		}, []string{"destination", "source", "permission", "result"}),
		misconfigured: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "l7_misconfigured_intentions",
			Help: "Intentions with HTTP permissions on a destination whose protocol is not HTTP (their callers are denied).",
		}, []string{"destination"}),
		destinations: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "destinations",
			Help: "Destinations whose intentions the authorizer watches.",
		}),
		stale: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "haconnect", Subsystem: "spoa", Name: "destination_stale",
			Help: "1 while Consul has not answered for the destination past the stale window (every caller is denied).",
		}, []string{"destination"}),
	}
	for _, r := range Reasons() {
		if r == ReasonIntentionAllow || r == ReasonDefaultAllow || r == ReasonL7Intention {
			m.decisions[1][r] = decisions.WithLabelValues("allow", r.String())
		} else {
			m.decisions[0][r] = decisions.WithLabelValues("deny", r.String())
		}
	}
	for _, q := range []string{queryRoots, queryIntentions, queryAuthorize, queryChain} {
		m.consulErrors[q] = errs.WithLabelValues(q)
	}
	if reg != nil {
		reg.MustRegister(decisions, lookups, errs, m.latency, m.consulUp, m.intentionLoads, m.l7Requests, m.misconfigured, m.destinations, m.stale)
	}
	return m
}

func (m *Metrics) observe(d *Decision, start time.Time) {
	if m == nil {
		return
	}
	allow := 0
	if d.Allow {
		allow = 1
	}
	if c := m.decisions[allow][d.Reason]; c != nil { // nil: a combination that cannot happen
		c.Inc()
	}
	m.latency.Observe(time.Since(start).Seconds())
}

func (m *Metrics) lookup(hit bool) {
	if m == nil {
		return
	}
	if hit {
		m.cacheHits.Inc()
	} else {
		m.cacheMisses.Inc()
	}
}

func (m *Metrics) consulError(query string) {
	if m != nil {
		m.consulErrors[query].Inc()
	}
}

func (m *Metrics) setConsulUp(up bool) {
	if m == nil {
		return
	}
	if up {
		m.consulUp.Set(1)
	} else {
		m.consulUp.Set(0)
	}
}

func (m *Metrics) intentionUpdate() {
	if m != nil {
		m.intentionLoads.Inc()
	}
}

// l7Counter returns the counter of one permission's decisions. Without
// metrics it returns a counter nobody reads.
func (m *Metrics) l7Counter(destination, source, permission string, allow bool) prometheus.Counter {
	if m == nil {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "unused"})
	}
	result := "deny"
	if allow {
		result = "allow"
	}
	return m.l7Requests.WithLabelValues(destination, source, permission, result)
}

func (m *Metrics) setMisconfigured(destination string, n int) {
	if m != nil {
		m.misconfigured.WithLabelValues(destination).Set(float64(n))
	}
}

func (m *Metrics) setDestinations(n int) {
	if m != nil {
		m.destinations.Set(float64(n))
	}
}

func (m *Metrics) setStale(destination string, stale bool) {
	if m == nil {
		return
	}
	if stale {
		m.stale.WithLabelValues(destination).Set(1)
	} else {
		m.stale.DeleteLabelValues(destination)
	}
}
