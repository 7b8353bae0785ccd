package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestReadResponse(t *testing.T) {
	for _, c := range []struct {
		in     string
		code   int
		closed bool
		rest   string
		body   string // kept only for a short answer other than 200
	}{
		{"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokNEXT", 200, false, "NEXT", ""},
		{"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nnoNEXT", 403, true, "NEXT", "no"},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nNEXT", 200, false, "NEXT", ""},
		{"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\nNEXT", 200, true, "NEXT", ""},
		{"HTTP/1.1 204 No Content\r\n\r\nNEXT", 204, false, "NEXT", ""},
	} {
		r := bufio.NewReader(strings.NewReader(c.in))
		code, closed, body, err := readResponse(r)
		rest := make([]byte, 16)
		n, _ := r.Read(rest)
		if err != nil || code != c.code || closed != c.closed || string(rest[:n]) != c.rest || body != c.body {
			t.Errorf("%q: code %d closed %v body %q err %v rest %q", c.in, code, closed, body, err, rest[:n])
		}
	}
	for _, bad := range []string{"HTTP/1.1 2x0 OK\r\n\r\n", "garbage\r\n\r\n", "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "HTTP/1.1 200 OK\r\nno colon\r\n\r\n"} {
		if _, _, _, err := readResponse(bufio.NewReader(strings.NewReader(bad))); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

// TestRunAgainstNetHTTP runs the generator against Go's own server, keep-alive
// and a connection per request, and checks that every answer was counted.
func TestRunAgainstNetHTTP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/chunked" {
			w.Write([]byte("a"))
			w.(http.Flusher).Flush()
			w.Write([]byte("b"))
			return
		}
		fmt.Fprint(w, strings.Repeat("x", 100))
	})}
	go srv.Serve(l)
	defer srv.Close()
	for _, cfg := range []Config{
		{Addr: l.Addr().String(), Conns: 4, Duration: 300 * time.Millisecond},
		{Addr: l.Addr().String(), Conns: 4, Duration: 300 * time.Millisecond, Path: "/chunked"},
		{Addr: l.Addr().String(), Conns: 2, Duration: 300 * time.Millisecond, NewConnPerRequest: true},
	} {
		res := Run(context.Background(), cfg)
		if res.Errors > 0 || res.Requests < 10 {
			t.Errorf("%+v: %s (%s)", cfg, res, res.FirstError)
		}
	}
}

func TestParseWrk(t *testing.T) {
	out := `Running 1s test @ http://127.0.0.1:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   672.03us  213.32us   4.69ms   88.52%
    Req/Sec    47.99k     2.51k   50.73k    80.00%
  Latency Distribution
     50%  615.00us
     75%  710.00us
     90%  866.00us
     99%    1.62ms
  47762 requests in 1.00s, 3.69MB read
  Socket errors: connect 0, read 2, write 0, timeout 0
  Non-2xx or 3xx responses: 10
Requests/sec:  47762.13
Transfer/sec:      3.69MB
`
	var res Result
	if err := parseWrk(out, &res); err != nil {
		t.Fatal(err)
	}
	if res.Requests != 47752 || res.Errors != 12 || res.P50 != 615*time.Microsecond || res.P90 != 866*time.Microsecond ||
		res.P99 != 1620*time.Microsecond || res.RPS < 47751 || res.RPS > 47753 {
		t.Errorf("%+v", res)
	}
	if err := parseWrk("nothing", &res); err == nil {
		t.Error("no error for output without a summary")
	}
}

// TestRunWrkInterrupted stops a long wrk run through its context and still
// gets its summary.
func TestRunWrkInterrupted(t *testing.T) {
	if _, err := WrkPath(); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })}
	go srv.Serve(l)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	res := RunWrk(ctx, WrkConfig{Addr: l.Addr().String(), Conns: 4, Duration: 30 * time.Second})
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("wrk ran %s after its context was done", took)
	}
	if res.Errors > 0 || res.Requests < 10 || res.Generator != "wrk" || res.GeneratorCPU <= 0 {
		t.Errorf("%s, %+v", res, res)
	}
}

// TestRunH2loadGRPC runs h2load's gRPC health checks against grpc-go's
// own health server in h2c.
func TestRunH2loadGRPC(t *testing.T) {
	if _, err := H2loadPath(); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, health.NewServer())
	go s.Serve(l)
	defer s.Stop()
	res := RunH2load(context.Background(), GRPCHealthCheck(l.Addr().String(), 2, 8, 200*time.Millisecond, time.Second))
	if res.Errors > 0 || res.Requests < 10 || res.RPS <= 0 || res.P50 <= 0 || res.GeneratorRequests < res.Requests || res.Generator != "h2load" {
		t.Errorf("%s, %+v", res, res)
	}
	// The measured second's requests, not the warm-up's.
	if rate := float64(res.Requests); res.RPS < rate*0.8 || res.RPS > rate*1.25 {
		t.Errorf("%.0f req/s for %d requests in 1s", res.RPS, res.Requests)
	}
	// A method the server does not have is answered 200 with a gRPC error
	// in the trailers, which h2load counts as a success: the benchmark
	// checks the call with a real client before it loads it.
	bad := RunH2load(context.Background(), H2loadConfig{Addr: l.Addr().String(), Path: "/nope.Nope/Nope", Conns: 1, Streams: 1, Duration: time.Second,
		Headers: []string{"content-type: application/grpc", "te: trailers"}, Data: []byte{0, 0, 0, 0, 0}})
	if bad.Requests == 0 {
		t.Errorf("h2load no longer counts a gRPC error as an answer: %+v", bad)
	}
}
