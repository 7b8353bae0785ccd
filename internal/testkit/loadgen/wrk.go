package loadgen

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// WrkConfig describes a keep-alive run of wrk (Debian's package `wrk`), the
// generator for plain HTTP entry points: one thread of C with epoll costs
// a fraction of what any Go client does per request.
type WrkConfig struct {
	Addr     string        // host:port, plain HTTP
	Path     string        // default "/"
	Conns    int           // default 16
	Duration time.Duration // rounded up to whole seconds (wrk's unit); default 5s
	Headers  []string      // "name: value" lines added to every request
}

// WrkPath is wrk's binary, or an error saying how to install it.
func WrkPath() (string, error) {
	if p, err := exec.LookPath("wrk"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/bin/wrk", "/usr/local/bin/wrk"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("wrk is not installed: `make tools` (scripts/tools.sh) installs Debian's package wrk")
}

// RunWrk runs wrk with one thread (it inherits this process's CPU
// affinity) for cfg.Duration or until ctx is done, and reads its summary:
// wrk stops at an interrupt (sent when ctx is done) and still prints it.
// Answers other than 2xx/3xx and socket errors count as errors.
func RunWrk(ctx context.Context, cfg WrkConfig) Result {
	var res Result
	bin, err := WrkPath()
	if err != nil {
		res.Errors, res.FirstError = 1, err.Error()
		return res
	}
	if cfg.Conns <= 0 {
		cfg.Conns = 16
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 5 * time.Second
	}
	if cfg.Path == "" {
		cfg.Path = "/"
	}
	secs := int(math.Ceil(cfg.Duration.Seconds()))
	args := []string{"-t1", "-c", strconv.Itoa(cfg.Conns), "-d", fmt.Sprintf("%ds", secs), "--timeout", "5s", "--latency"}
	for _, h := range cfg.Headers {
		args = append(args, "-H", h)
	}
	args = append(args, "http://"+cfg.Addr+cfg.Path)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Cancel = func() error {
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			return err
		}
		// wrk exits 0 after an interrupt: its status is what counts.
		return fmt.Errorf("interrupted: %w", os.ErrProcessDone)
	}
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		res.Errors, res.FirstError = 1, fmt.Sprintf("wrk %s: %v\n%s", strings.Join(args, " "), err, out)
		return res
	}
	res.Generator = "wrk"
	if st := cmd.ProcessState; st != nil {
		res.GeneratorCPU = st.UserTime() + st.SystemTime()
	}
	if err := parseWrk(string(out), &res); err != nil {
		res.Errors, res.FirstError = max(res.Errors, 1), fmt.Sprintf("wrk %s: %v\n%s", strings.Join(args, " "), err, out)
	} else if res.Requests == 0 || res.Errors > 0 {
		res.FirstError = fmt.Sprintf("%s; wrk %s:\n%s", res.FirstError, strings.Join(args, " "), out)
	}
	return res
}

var (
	wrkTotal   = regexp.MustCompile(`(\d+) requests in ([0-9.]+)(us|ms|s|m)\b`)
	wrkPct     = regexp.MustCompile(`^\s+(50|90|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s|m)\s*$`)
	wrkNon2xx  = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkSockErr = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

func wrkDuration(v, unit string) time.Duration {
	f, _ := strconv.ParseFloat(v, 64)
	switch unit {
	case "us":
		return time.Duration(f * float64(time.Microsecond))
	case "ms":
		return time.Duration(f * float64(time.Millisecond))
	case "m":
		return time.Duration(f * float64(time.Minute))
	}
	return time.Duration(f * float64(time.Second))
}

// parseWrk reads wrk's text summary (with --latency).
func parseWrk(out string, res *Result) error {
	m := wrkTotal.FindStringSubmatch(out)
	if m == nil {
		return fmt.Errorf("no request count in wrk's output")
	}
	res.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	elapsed := wrkDuration(m[2], m[3])
	if elapsed <= 0 {
		return fmt.Errorf("no duration in wrk's output")
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if p := wrkPct.FindStringSubmatch(sc.Text()); p != nil {
			d := wrkDuration(p[2], p[3])
			switch p[1] {
			case "50":
				res.P50 = d
			case "90":
				res.P90 = d
			case "99":
				res.P99 = d
			}
		}
	}
	if n := wrkNon2xx.FindStringSubmatch(out); n != nil {
		v, _ := strconv.ParseInt(n[1], 10, 64)
		res.Errors += v
		res.Requests -= v
		res.FirstError = "non-2xx/3xx answers"
	}
	if s := wrkSockErr.FindStringSubmatch(out); s != nil {
		var sum int64
		for _, f := range s[1:] {
			v, _ := strconv.ParseInt(f, 10, 64)
			sum += v
		}
		if sum > 0 {
			res.Errors += sum
			if res.FirstError == "" {
				res.FirstError = strings.TrimSpace(s[0])
			}
		}
	}
	res.RPS = float64(res.Requests) / elapsed.Seconds()
	return nil
}
