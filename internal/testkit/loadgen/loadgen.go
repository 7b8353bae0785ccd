// Package loadgen is a small HTTP/1.1 load generator that speaks mTLS with
// client certificates (wrk, hey and h2load do not). It runs a fixed number
// of connections for a fixed time, keep-alive or one connection per
// request, and reports throughput, latency percentiles and errors.
package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"
)

// Config describes one load run.
type Config struct {
	// Addr is host:port; TLS nil means plain HTTP.
	Addr string
	TLS  *tls.Config
	// Path of the requests (default "/"); their Host header is Addr.
	Path string
	// Conns is the number of concurrent connections (default 16).
	Conns int
	// Duration of the run (default 5s).
	Duration time.Duration
	// NewConnPerRequest closes the connection after every request.
	NewConnPerRequest bool
	// Header lines added to every request, e.g. "traceparent: ...".
	Headers []string
}

// Result summarises a run.
type Result struct {
	Requests int64
	Errors   int64
	RPS      float64
	P50      time.Duration
	P90      time.Duration
	P99      time.Duration
	// FirstError is an example of what failed.
	FirstError string
	// Generator is the load generator that ran ("go", "wrk"), and
	// GeneratorCPU the CPU time it used: what the load side spent.
	Generator    string
	GeneratorCPU time.Duration
	// GeneratorRequests is how many requests the generator made in the
	// time GeneratorCPU covers, when that is more than Requests (h2load's
	// warm-up); 0: Requests.
	GeneratorRequests int64
}

func (r Result) String() string {
	return fmt.Sprintf("%.0f req/s, p50 %s p90 %s p99 %s, %d requests, %d errors",
		r.RPS, r.P50.Round(time.Microsecond), r.P90.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Requests, r.Errors)
}

// Run sends load until cfg.Duration has passed or ctx is done.
func Run(ctx context.Context, cfg Config) Result {
	if cfg.Conns <= 0 {
		cfg.Conns = 16
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 5 * time.Second
	}
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	req := "GET " + cfg.Path + " HTTP/1.1\r\nHost: " + cfg.Addr + "\r\n"
	for _, h := range cfg.Headers {
		req += h + "\r\n"
	}
	// In new-connection mode the request does not ask the server to close:
	// the client resets the connection itself once the answer is read, so
	// that neither side keeps TIME_WAIT entries on this single host.
	req += "\r\n"

	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	workers := make([]worker, cfg.Conns)
	var wg sync.WaitGroup
	cpu0, _ := CPUTime(os.Getpid())
	start := time.Now()
	for i := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			w.run(ctx, cfg, []byte(req))
		}(&workers[i])
	}
	wg.Wait()
	res := collect(workers, time.Since(start))
	cpu1, _ := CPUTime(os.Getpid())
	res.Generator, res.GeneratorCPU = "go", cpu1-cpu0
	return res
}

// collect sums the workers' counts and latencies over elapsed.
func collect(workers []worker, elapsed time.Duration) Result {
	var res Result
	var lat []time.Duration
	for i := range workers {
		w := &workers[i]
		res.Requests += int64(len(w.lat))
		res.Errors += w.errors
		lat = append(lat, w.lat...)
		if res.FirstError == "" {
			res.FirstError = w.firstError
		}
	}
	res.summarize(lat, elapsed)
	return res
}

// summarize sets the rate and the latency percentiles from the successful
// requests' latencies over elapsed.
func (res *Result) summarize(lat []time.Duration, elapsed time.Duration) {
	res.RPS = float64(res.Requests) / elapsed.Seconds()
	res.percentiles(lat)
}

// percentiles sets P50, P90 and P99 from the latencies (sorted in place).
func (res *Result) percentiles(lat []time.Duration) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(float64(len(lat))*p))]
	}
	res.P50, res.P90, res.P99 = pct(0.50), pct(0.90), pct(0.99)
}

type worker struct {
	lat        []time.Duration
	errors     int64
	firstError string
}

func (w *worker) fail(err error) {
	w.errors++
	if w.firstError == "" {
		w.firstError = err.Error()
	}
}

func (w *worker) run(ctx context.Context, cfg Config, req []byte) {
	var conn net.Conn
	var r *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	// The clock decides when the run ends, not only ctx: on a saturated
	// CPU the context's timer can fire late, and a dial against a passed
	// deadline fails at once, so failures after the end are not errors.
	end, _ := ctx.Deadline()
	live := func() bool { return ctx.Err() == nil && time.Now().Before(end) }
	for live() {
		start := time.Now()
		if conn == nil {
			c, err := dialer.DialContext(ctx, "tcp", cfg.Addr)
			if err != nil {
				if live() {
					w.fail(err)
				}
				continue
			}
			if cfg.TLS != nil {
				tc := tls.Client(c, cfg.TLS)
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					if live() {
						w.fail(err)
					}
					continue
				}
				c = tc
			}
			conn, r = c, bufio.NewReaderSize(c, 16<<10)
			// The run's deadline does not move: set once per connection
			// (each SetDeadline re-arms a runtime timer).
			if dl, ok := ctx.Deadline(); ok {
				_ = conn.SetDeadline(dl.Add(2 * time.Second))
			}
		}
		code, closed, body, err := roundTrip(conn, r, req)
		if err != nil {
			conn.Close()
			conn = nil
			if live() {
				w.fail(err)
			}
			continue
		}
		if code != http.StatusOK {
			w.fail(fmt.Errorf("status %d %q", code, body))
		} else {
			w.lat = append(w.lat, time.Since(start))
		}
		if cfg.NewConnPerRequest || closed {
			closeNow(conn)
			conn = nil
		}
	}
}

// closeNow closes a finished connection with a reset instead of a FIN, so
// that the client keeps no TIME_WAIT entry: at thousands of new connections
// a second, TIME_WAIT would exhaust the ephemeral ports within seconds.
func closeNow(c net.Conn) {
	raw := c
	if tc, ok := c.(*tls.Conn); ok {
		raw = tc.NetConn()
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0)
	}
	c.Close()
}

// roundTrip writes one request and reads its response: the status code
// and whether the server closes the connection after it. It parses the
// response itself, allocating nothing per request: with net/http's reader
// the generator spent more CPU per request than a one-hop data plane, and
// could not keep that data plane's core busy.
func roundTrip(conn net.Conn, r *bufio.Reader, req []byte) (code int, closed bool, body string, err error) {
	if _, err := conn.Write(req); err != nil {
		return 0, false, "", err
	}
	return readResponse(r)
}

// readResponse reads one HTTP/1.x response from r and discards its body
// (Content-Length or chunked; a response with neither is read to the
// connection's end). The body of a short answer other than 200 is returned,
// since it says why (HAProxy's and haconnect's refusals do).
func readResponse(r *bufio.Reader) (code int, closed bool, body string, err error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, false, "", err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, false, "", fmt.Errorf("malformed status line %q", line)
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return 0, false, "", fmt.Errorf("malformed status line %q", line)
		}
		code = code*10 + int(c-'0')
	}
	closed = line[7] == '0' // HTTP/1.0 closes unless it says otherwise
	length, chunked := int64(-1), false
	for {
		line, err = r.ReadSlice('\n')
		if err != nil {
			return 0, false, "", err
		}
		if len(line) <= 2 { // the empty line ending the header block
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, false, "", fmt.Errorf("malformed header line %q", line)
		}
		value = bytes.TrimSpace(value)
		switch {
		case asciiEqualFold(name, "content-length"):
			n, perr := strconv.ParseInt(string(value), 10, 64)
			if perr != nil || n < 0 {
				return 0, false, "", fmt.Errorf("malformed content-length %q", value)
			}
			length = n
		case asciiEqualFold(name, "transfer-encoding"):
			chunked = asciiEqualFold(value, "chunked")
		case asciiEqualFold(name, "connection"):
			if asciiEqualFold(value, "close") {
				closed = true
			} else if asciiEqualFold(value, "keep-alive") {
				closed = false
			}
		}
	}
	switch {
	case code == http.StatusNoContent || code == http.StatusNotModified || code < 200:
	case chunked:
		err = discardChunked(r)
	case length >= 0:
		if code != http.StatusOK && length <= 512 {
			var b []byte
			if b, err = r.Peek(int(length)); err == nil {
				body = string(b)
			}
		}
		_, err = r.Discard(int(length))
	default:
		_, err = io.Copy(io.Discard, r)
		closed = true
	}
	return code, closed, body, err
}

func discardChunked(r *bufio.Reader) error {
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		size, _, _ := bytes.Cut(bytes.TrimSpace(line), []byte(";"))
		n, err := strconv.ParseInt(string(size), 16, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("malformed chunk size %q", line)
		}
		if n == 0 { // trailers, then the empty line
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					return err
				}
				if len(line) <= 2 {
					return nil
				}
			}
		}
		if _, err := r.Discard(int(n) + 2); err != nil {
			return err
		}
	}
}

// asciiEqualFold compares a header name or value with a lower-case word.
func asciiEqualFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range b {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}
