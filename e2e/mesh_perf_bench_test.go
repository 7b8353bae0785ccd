package e2e

// Where each data plane's CPU goes, from `perf` (Debian's linux-perf):
// after BenchmarkMesh's rounds, one more keep-alive run of each scenario
// is sampled (not measured: sampling costs the data plane a little), and
// the samples are split by what ran: TLS crypto (OpenSSL's libraries, or
// Go's crypto packages in Consul's proxy), the kernel (sockets, TCP on
// loopback, scheduling), Lua, and the proxy's own code.

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
)

// cpuShares is a data plane's samples by category, in percent.
type cpuShares map[string]float64

// perfBreakdown is the report's CPU breakdown: each scenario's shares and
// CPU per request, or why there is none.
type perfBreakdown struct {
	note      string
	scenarios []*meshScenario
	shares    map[string]cpuShares
	// The system calls per request (mesh_syscalls_bench_test.go), or why
	// there are none.
	syscallNote string
	syscalls    map[string]syscallCounts
}

// The categories, in the report's order.
var shareOrder = []string{"TLS crypto", "kernel", "Lua", "the proxy's code", "libc and the rest"}

// perfCheck says whether perf can sample processes here ("" if it can).
func perfCheck(b testing.TB) string {
	bin, err := exec.LookPath("perf")
	if err != nil {
		return "perf is not installed (Debian's package linux-perf)"
	}
	out, err := exec.Command(bin, "record", "-q", "-o", filepath.Join(harness.TempDir(b), "check.data"), "--", "true").CombinedOutput()
	if err != nil {
		return fmt.Sprintf("perf cannot sample here: %v %s", err, strings.TrimSpace(string(out)))
	}
	return ""
}

// profileScenario runs sc's keep-alive load, and once it is steady samples
// sc's processes for dur.
func profileScenario(b *testing.B, app *benchAppServer, sc *meshScenario, tlsCfg *tls.Config, dur time.Duration) (cpuShares, error) {
	done, cancel := startWarmLoad(b, app, sc, loadgen.Config{Addr: sc.addr, Conns: 32, Duration: time.Minute}, tlsCfg, warmFor(32))
	defer cancel()
	data := filepath.Join(harness.TempDir(b), "perf.data")
	var pids []string
	for _, p := range sc.pids {
		pids = append(pids, strconv.Itoa(p))
	}
	out, err := exec.Command("perf", "record", "-q", "-F", "1999", "-p", strings.Join(pids, ","), "-o", data,
		"--", "sleep", fmt.Sprintf("%.3f", dur.Seconds())).CombinedOutput()
	cancel()
	res := <-done
	if err != nil {
		return nil, fmt.Errorf("perf record: %v %s", err, out)
	}
	if res.Errors > 0 {
		return nil, fmt.Errorf("the load failed: %s", res.FirstError)
	}
	report, err := exec.Command("perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none",
		"--percent-limit", "0").Output()
	if err != nil {
		return nil, fmt.Errorf("perf report: %v", err)
	}
	b.Logf("perf, %s: the busiest symbols\n%s", sc.name, topPerfLines(string(report), 15))
	return parsePerfReport(string(report)), nil
}

// topPerfLines is the first n sample lines of a perf report, for the log.
func topPerfLines(out string, n int) string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if len(lines) < n && perfLine.MatchString(l) {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

var perfLine = regexp.MustCompile(`^\s+([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$`)

// parsePerfReport sums `perf report --sort dso,sym` lines by category.
func parsePerfReport(out string) cpuShares {
	shares := cpuShares{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		m := perfLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		pct, _ := strconv.ParseFloat(m[1], 64)
		dso, kind, sym := m[2], m[3], m[4]
		switch {
		case strings.Contains(dso, "libcrypto") || strings.Contains(dso, "libssl"),
			strings.HasPrefix(sym, "crypto/") || strings.Contains(sym, "golang.org/x/crypto"):
			shares["TLS crypto"] += pct
		case kind == "k" || strings.HasPrefix(dso, "[kernel"):
			shares["kernel"] += pct
		case strings.Contains(dso, "liblua"):
			shares["Lua"] += pct
		case dso == "haproxy" || dso == "consul" || dso == "haconnect":
			shares["the proxy's code"] += pct
		default:
			shares["libc and the rest"] += pct
		}
	}
	return shares
}

// perfTable is the report's CPU breakdown.
func (r report) perfTable() string {
	p := r.perf
	var s strings.Builder
	s.WriteString("## Where the data plane's CPU goes (perf, keep-alive, 32 connections)\n\n")
	if p.note != "" {
		fmt.Fprintf(&s, "No breakdown: %s.\n\n", p.note)
		return s.String()
	}
	s.WriteString("One more run of each scenario after the rounds, its data plane's processes sampled by `perf record -F 1999` " +
		"once the rate is steady (not a measured run); self time by shared object and symbol. TLS crypto is OpenSSL's " +
		"libcrypto and libssl, or Go's crypto packages in Consul's proxy; the kernel is sockets, TCP over loopback and scheduling; " +
		"the microseconds are the shares of the scenario's measured CPU per request.\n\n")
	s.WriteString("| scenario | data plane CPU/request |")
	for _, c := range shareOrder {
		s.WriteString(" " + c + " |")
	}
	s.WriteString("\n|---|---|" + strings.Repeat("---|", len(shareOrder)) + "\n")
	for _, sc := range p.scenarios {
		sh, ok := p.shares[sc.name]
		if !ok {
			continue
		}
		cpu := median(sc.cpu["keep-alive"])
		fmt.Fprintf(&s, "| %s | %.1f us |", sc.name, cpu)
		for _, c := range shareOrder {
			fmt.Fprintf(&s, " %.0f%% (%.1f us) |", sh[c], sh[c]*cpu/100)
		}
		s.WriteString("\n")
	}
	s.WriteString("\n")
	return s.String()
}

// profileAll samples each scenario that has a data plane, keep-alive, for
// dur each, or says why it cannot.
func profileAll(b *testing.B, app *benchAppServer, tlsCfg *tls.Config, scenarios []*meshScenario, dur time.Duration) perfBreakdown {
	p := perfBreakdown{note: perfCheck(b), shares: map[string]cpuShares{}, syscallNote: syscallCheck(), syscalls: map[string]syscallCounts{}}
	if p.note != "" {
		b.Logf("no CPU breakdown: %s", p.note)
	}
	if p.syscallNote != "" {
		b.Logf("no system call count: %s", p.syscallNote)
	}
	for _, sc := range scenarios {
		if len(sc.pids) == 0 {
			continue
		}
		p.scenarios = append(p.scenarios, sc)
		if p.note == "" {
			sh, err := profileScenario(b, app, sc, tlsCfg, dur)
			if err != nil {
				b.Fatalf("%s: CPU breakdown: %v", sc.name, err)
			}
			p.shares[sc.name] = sh
			b.Logf("CPU breakdown %-48s %v", sc.name, sh)
		}
		if p.syscallNote == "" {
			c, err := countSyscalls(b, app, sc, tlsCfg, dur)
			if err != nil {
				b.Fatalf("%s: system calls: %v", sc.name, err)
			}
			p.syscalls[sc.name] = c
			b.Logf("system calls per request %-48s %v", sc.name, c)
		}
	}
	return p
}
