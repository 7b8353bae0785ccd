// Package dnstest is a small authoritative DNS server over UDP on loopback
// whose answers a test sets and changes: A and AAAA records by name, "no
// such name" (NXDOMAIN) for the rest, and names that get SERVFAIL or no
// answer at all. Go's resolver talks to it for real (dnsresolve.NetResolver).
package dnstest

import (
	"net"
	"net/netip"
	"strings"
	"sync"

	"golang.org/x/net/dns/dnsmessage"
)

// Server answers DNS queries on a loopback UDP port.
type Server struct {
	conn *net.UDPConn
	done chan struct{}

	mu       sync.Mutex
	records  map[string][]netip.Addr
	servfail map[string]bool
	silent   map[string]bool
	queries  map[string]int
}

// Start listens on 127.0.0.1 (a free port) and serves until Close.
func Start() (*Server, error) {
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	s := &Server{conn: conn, done: make(chan struct{}), records: map[string][]netip.Addr{},
		servfail: map[string]bool{}, silent: map[string]bool{}, queries: map[string]int{}}
	go s.serve()
	return s, nil
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return s.conn.LocalAddr().String() }

// Close stops the server.
func (s *Server) Close() {
	s.conn.Close()
	<-s.done
}

func canon(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

// Set makes name answer addrs (none: NOERROR with no records) and clears
// any failure set for it.
func (s *Server) Set(name string, addrs ...string) {
	var ips []netip.Addr
	for _, a := range addrs {
		ips = append(ips, netip.MustParseAddr(a))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := canon(name)
	s.records[n] = ips
	delete(s.servfail, n)
	delete(s.silent, n)
}

// Delete makes name unknown (NXDOMAIN).
func (s *Server) Delete(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := canon(name)
	delete(s.records, n)
	delete(s.servfail, n)
	delete(s.silent, n)
}

// ServFail makes queries for name get SERVFAIL.
func (s *Server) ServFail(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.servfail[canon(name)] = true
}

// Silent makes queries for name go unanswered (a nameserver that times out).
func (s *Server) Silent(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.silent[canon(name)] = true
}

// Queries is how many questions for name arrived.
func (s *Server) Queries(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[canon(name)]
}

func (s *Server) serve() {
	defer close(s.done)
	buf := make([]byte, 1500)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if out, ok := s.answer(buf[:n]); ok {
			s.conn.WriteToUDPAddrPort(out, from) //nolint:errcheck // the client retries
		}
	}
}

// answer builds the reply to one query; false: do not answer.
func (s *Server) answer(q []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil, false
	}
	question, err := p.Question()
	if err != nil {
		return nil, false
	}
	name := canon(question.Name.String())
	s.mu.Lock()
	s.queries[name]++
	ips, known := s.records[name]
	servfail, silent := s.servfail[name], s.silent[name]
	s.mu.Unlock()
	if silent {
		return nil, false
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	switch {
	case servfail:
		rh.RCode = dnsmessage.RCodeServerFailure
	case !known:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(question) != nil || b.StartAnswers() != nil {
		return nil, false
	}
	if rh.RCode == dnsmessage.RCodeSuccess {
		rr := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 1}
		for _, ip := range ips {
			switch {
			case question.Type == dnsmessage.TypeA && ip.Is4():
				if b.AResource(rr, dnsmessage.AResource{A: ip.As4()}) != nil {
					return nil, false
				}
			case question.Type == dnsmessage.TypeAAAA && ip.Is6():
				if b.AAAAResource(rr, dnsmessage.AAAAResource{AAAA: ip.As16()}) != nil {
					return nil, false
				}
			}
		}
	}
	out, err := b.Finish()
	return out, err == nil
}
