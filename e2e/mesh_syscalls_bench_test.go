package e2e

// System calls per request, counted by the kernel's tracepoints through
// `perf stat` (which, unlike strace, does not slow the processes down and
// so does not change how many events each poll returns). On this machine's
// virtual CPUs entering and leaving the kernel is dear: the kernel holds
// half or more of every data plane's CPU (the perf breakdown). After
// BenchmarkMesh's rounds, each profiled scenario runs its keep-alive load
// once more while its data plane's calls are counted.

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/loadgen"
)

// syscallKinds groups system calls for the report, in its order; a call
// in none of them counts in "other".
var syscallKinds = []struct {
	name  string
	calls []string
}{
	{"receive", []string{"recvfrom", "recvmsg", "read", "readv"}},
	{"send", []string{"sendto", "sendmsg", "write", "writev"}},
	{"poll", []string{"epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl"}},
	{"clock", []string{"clock_gettime", "gettimeofday"}},
	{"futex and scheduling", []string{"futex", "nanosleep", "sched_yield", "tgkill", "getpid", "rt_sigreturn"}},
}

// syscallCounts are a data plane's calls per request by kind ("other"
// included), and in all ("total").
type syscallCounts map[string]float64

// syscallCheck says whether perf can count system calls here ("" if it
// can): the kernel's tracepoints must be readable.
func syscallCheck() string {
	bin, err := exec.LookPath("perf")
	if err != nil {
		return "perf is not installed (Debian's package linux-perf)"
	}
	if out, err := exec.Command(bin, "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--", "true").CombinedOutput(); err != nil {
		return fmt.Sprintf("perf cannot count system calls here: %v %s", err, strings.TrimSpace(string(out)))
	}
	return ""
}

// countSyscalls runs sc's keep-alive load and, once it is steady, counts
// the system calls of sc's processes (every thread) for dur with the
// kernel's tracepoints, per request the app answered meanwhile.
func countSyscalls(b *testing.B, app *benchAppServer, sc *meshScenario, tlsCfg *tls.Config, dur time.Duration) (syscallCounts, error) {
	done, cancel := startWarmLoad(b, app, sc, loadgen.Config{Addr: sc.addr, Conns: 32, Duration: time.Minute}, tlsCfg, warmFor(32))
	defer cancel()
	events := []string{"raw_syscalls:sys_enter"}
	for _, k := range syscallKinds {
		for _, c := range k.calls {
			events = append(events, "syscalls:sys_enter_"+c)
		}
	}
	var pids []string
	for _, p := range sc.pids {
		pids = append(pids, strconv.Itoa(p))
	}
	// perf counts while its `sleep` runs, not while it sets the
	// tracepoints up: the requests counted are the app's steady rate over
	// perf's whole run, times the sleep. (perf's own running time column
	// is no clock here: a task's counters run only while it is on a CPU.)
	n0, t0 := app.requests(b), time.Now()
	out, err := exec.Command("perf", "stat", "-x", ",", "-e", strings.Join(events, ","), "-p", strings.Join(pids, ","),
		"--", "sleep", fmt.Sprintf("%.3f", dur.Seconds())).CombinedOutput()
	n1, elapsed := app.requests(b), time.Since(t0)
	cancel()
	res := <-done
	if err != nil {
		return nil, fmt.Errorf("perf stat: %v %s", err, out)
	}
	if res.Errors > 0 {
		return nil, fmt.Errorf("the load failed: %s", res.FirstError)
	}
	if n1 <= n0 {
		return nil, fmt.Errorf("no request answered while counting")
	}
	return parseSyscallCounts(string(out), float64(n1-n0)*dur.Seconds()/elapsed.Seconds())
}

// parseSyscallCounts reads `perf stat -x ,`'s lines ("<count>,<unit>,
// <event>,...") into calls per request by kind; "total" is every system
// call, "other" those of no kind.
func parseSyscallCounts(out string, requests float64) (syscallCounts, error) {
	kind := map[string]string{}
	for _, k := range syscallKinds {
		for _, c := range k.calls {
			kind["syscalls:sys_enter_"+c] = k.name
		}
	}
	counts := syscallCounts{}
	seen := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ",")
		if len(f) < 3 {
			continue
		}
		n, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue // "<not counted>", or a line that is not a count
		}
		switch ev := f[2]; {
		case ev == "raw_syscalls:sys_enter":
			counts["total"], seen = n/requests, true
		case kind[ev] != "":
			counts[kind[ev]] += n / requests
		}
	}
	if !seen {
		return nil, fmt.Errorf("no system call count in perf's output: %s", out)
	}
	other := counts["total"]
	for _, k := range syscallKinds {
		other -= counts[k.name]
	}
	counts["other"] = max(0, other)
	return counts, nil
}

// syscallTable is the report's system calls per request.
func (r report) syscallTable() string {
	p := r.perf
	var s strings.Builder
	s.WriteString("## System calls per request (keep-alive, 32 connections)\n\n")
	if p.syscallNote != "" {
		fmt.Fprintf(&s, "No count: %s.\n\n", p.syscallNote)
		return s.String()
	}
	s.WriteString("One more run of each scenario after the rounds, its data plane's system calls counted by the kernel's tracepoints " +
		"(`perf stat -e raw_syscalls:sys_enter` and one `syscalls:sys_enter_<call>` per call, every thread) once the rate is steady; " +
		"the calls over the requests the app answered meanwhile. Each system call enters and leaves this virtual machine's kernel, " +
		"which is why the kernel holds half or more of each data plane's CPU above. HAProxy 2.6 reads a TLS record in two calls " +
		"(its 5-byte header, then its body: OpenSSL reads no further ahead through HAProxy's own I/O layer) and reads its thread's " +
		"CPU clock before and after each poll (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, always a system call).\n\n")
	s.WriteString("| scenario | all |")
	for _, k := range syscallKinds {
		s.WriteString(" " + k.name + " |")
	}
	s.WriteString(" other |\n|---|---|" + strings.Repeat("---|", len(syscallKinds)+1) + "\n")
	for _, sc := range p.scenarios {
		c, ok := p.syscalls[sc.name]
		if !ok {
			continue
		}
		fmt.Fprintf(&s, "| %s | %.1f |", sc.name, c["total"])
		for _, k := range syscallKinds {
			fmt.Fprintf(&s, " %.1f |", c[k.name])
		}
		fmt.Fprintf(&s, " %.1f |\n", c["other"])
	}
	s.WriteString("\n")
	return s.String()
}
