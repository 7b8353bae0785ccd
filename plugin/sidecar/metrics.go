package sidecar

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	applies      *prometheus.CounterVec
	applyLatency *prometheus.HistogramVec
	configErrors prometheus.Counter
	consulErrors prometheus.Counter
	restarts     prometheus.Counter
	// chainRefusals counts distinct discovery chain refusals (chain.go).
	chainRefusals prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		applies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "applies_total",
			Help: "Configuration changes applied to HAProxy, by method (start, runtime, reload) and result.",
		}, []string{"method", "result"}),
		applyLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "apply_latency_seconds",
			Help:    "From a change seen in Consul to HAProxy running with it, by method.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method"}),
		configErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "config_errors_total",
			Help: "Registrations or configurations refused (the running configuration was kept).",
		}),
		consulErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "consul_errors_total",
			Help: "Failed Consul queries of the sidecar's watches.",
		}),
		restarts: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "haproxy_restarts_total",
			Help: "Times HAProxy exited unexpectedly and was started again.",
		}),
		chainRefusals: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "haconnect", Subsystem: "sidecar", Name: "chain_refusals_total",
			Help: "Distinct upstream discovery chains refused for settings haconnect cannot honour (the upstream's previous configuration was kept).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.applies, m.applyLatency, m.configErrors, m.consulErrors, m.restarts, m.chainRefusals)
	}
	return m
}
