package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// H2loadConfig describes a run of h2load (Debian's package
// nghttp2-client) in h2c: Conns connections, each with Streams requests
// in flight, for Warm (not measured) then Duration (measured). With Data
// set the requests are POSTs of it, which is how a gRPC unary call goes
// (GRPCHealthCheck).
type H2loadConfig struct {
	Addr           string
	Path           string
	Conns, Streams int
	Warm, Duration time.Duration
	Headers        []string // "name: value"
	Data           []byte
}

// GRPCHealthCheck returns the h2load configuration of the standard health
// service's Check with an empty request (a gRPC message frame: no
// compression, length 0).
func GRPCHealthCheck(addr string, conns, streams int, warm, dur time.Duration) H2loadConfig {
	return H2loadConfig{Addr: addr, Path: "/grpc.health.v1.Health/Check", Conns: conns, Streams: streams, Warm: warm, Duration: dur,
		Headers: []string{"content-type: application/grpc", "te: trailers"}, Data: []byte{0, 0, 0, 0, 0}}
}

// H2loadPath is h2load's binary, or an error saying how to install it.
func H2loadPath() (string, error) {
	if p, err := exec.LookPath("h2load"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("h2load is not installed: `make tools` (scripts/tools.sh) installs Debian's package nghttp2-client")
}

var (
	h2Requests = regexp.MustCompile(`requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
	h2Status   = regexp.MustCompile(`status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
	h2Finished = regexp.MustCompile(`finished in ([0-9.]+)(us|ms|s), ([0-9.]+) req/s`)
)

// RunH2load runs h2load with one thread (it inherits this process's CPU
// affinity). The requests, rate and errors are h2load's over the measured
// duration; an answer other than 2xx is an error; the percentiles come
// from its per-request log; GeneratorCPU covers the whole run, warm-up
// included (GeneratorRequests counts the requests it made in that time).
func RunH2load(ctx context.Context, cfg H2loadConfig) Result {
	var res Result
	bin, err := H2loadPath()
	if err != nil {
		res.Errors, res.FirstError = 1, err.Error()
		return res
	}
	dir, err := os.MkdirTemp("", "h2load-")
	if err != nil {
		res.Errors, res.FirstError = 1, err.Error()
		return res
	}
	defer os.RemoveAll(dir)
	logFile := filepath.Join(dir, "requests.log")
	args := []string{"-t", "1", "-c", strconv.Itoa(max(1, cfg.Conns)), "-m", strconv.Itoa(max(1, cfg.Streams)),
		"-D", fmt.Sprintf("%dms", max(cfg.Duration, time.Second).Milliseconds()), "--log-file", logFile}
	if cfg.Warm > 0 {
		args = append(args, "--warm-up-time", fmt.Sprintf("%dms", cfg.Warm.Milliseconds()))
	}
	if cfg.Data != nil {
		data := filepath.Join(dir, "body")
		if err := os.WriteFile(data, cfg.Data, 0o600); err != nil {
			res.Errors, res.FirstError = 1, err.Error()
			return res
		}
		args = append(args, "-d", data)
	}
	for _, h := range cfg.Headers {
		args = append(args, "-H", h)
	}
	args = append(args, "http://"+cfg.Addr+cfg.Path)
	cmd := exec.CommandContext(ctx, bin, args...)
	out, err := cmd.CombinedOutput()
	res.Generator = "h2load"
	if st := cmd.ProcessState; st != nil {
		res.GeneratorCPU = st.UserTime() + st.SystemTime()
	}
	fail := func(why string) Result {
		res.Errors = max(res.Errors, 1)
		res.FirstError = fmt.Sprintf("%s; h2load %s:\n%s", why, strings.Join(args, " "), out)
		return res
	}
	if err != nil {
		return fail(err.Error())
	}
	m := h2Requests.FindStringSubmatch(string(out))
	f := h2Finished.FindStringSubmatch(string(out))
	st := h2Status.FindStringSubmatch(string(out))
	if m == nil || f == nil || st == nil {
		return fail("no summary in h2load's output")
	}
	n := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	ok2xx := n(st[1])
	res.Requests = ok2xx
	res.Errors = n(m[5]) + n(m[6]) + n(m[7]) + n(st[2]) + n(st[3]) + n(st[4])
	rate, _ := strconv.ParseFloat(f[3], 64)
	if total := n(m[4]); total > 0 {
		res.RPS = rate * float64(ok2xx) / float64(total)
	}
	if res.Errors > 0 {
		res.FirstError = fmt.Sprintf("%d failed, %d errored, %d timeout, %d 3xx, %d 4xx, %d 5xx", n(m[5]), n(m[6]), n(m[7]), n(st[2]), n(st[3]), n(st[4]))
	}
	lat, all, err := readH2loadLog(logFile)
	if err != nil {
		return fail(err.Error())
	}
	res.GeneratorRequests = all
	res.percentiles(lat)
	return res
}

// readH2loadLog reads h2load's per-request log: the latencies of the 2xx
// answers, and how many requests there were in all.
func readH2loadLog(path string) ([]time.Duration, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	var lat []time.Duration
	var all int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), "\t")
		if len(fields) < 3 {
			continue
		}
		all++
		code, _ := strconv.Atoi(fields[1])
		us, err := strconv.ParseInt(fields[2], 10, 64)
		if err == nil && code >= 200 && code < 300 {
			lat = append(lat, time.Duration(us)*time.Microsecond)
		}
	}
	return lat, all, sc.Err()
}
