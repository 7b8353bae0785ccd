// Package promserve gives haconnect's commands their Prometheus registry
// and the HTTP listener that serves it at /metrics.
package promserve

import (
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a registry holding the Go runtime and process
// collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Listen opens addr; Serve then serves reg's /metrics on it until Close.
func Listen(addr string) (*Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &Server{l: l}, nil
}

// Server is an open metrics listener.
type Server struct {
	l  net.Listener
	hs *http.Server
}

// Addr is the listening address.
func (s *Server) Addr() string { return s.l.Addr().String() }

// Serve starts serving reg in the background.
func (s *Server) Serve(reg prometheus.Gatherer) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	s.hs = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.hs.Serve(s.l) }()
}

// Close stops serving (or closes the listener if Serve was never called).
func (s *Server) Close() error {
	if s.hs != nil {
		return s.hs.Close()
	}
	return s.l.Close()
}
