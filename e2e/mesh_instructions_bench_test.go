package e2e

// The per-feature table's instruction counts: each variant's two HAProxies
// again, each under valgrind's callgrind, which counts the user-space
// instructions a process executes. Unlike CPU time, a count does not move
// with what else a shared machine runs, so it tells a feature's cost even
// when the timed runs are too noisy to. It leaves out the kernel's work
// (the same for every variant: the same sockets and syscalls), counts each
// byte of a `rep movsb` copy as an instruction, and does not see glibc's
// malloc (valgrind replaces it).

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/testkit/loadgen"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// callgrindTools are valgrind's programs the count needs (Debian's package
// valgrind, installed by `make tools`).
func callgrindTools(b testing.TB) (valgrind, control string) {
	look := func(name string) string {
		p, err := exec.LookPath(name)
		if err != nil {
			b.Fatalf("%s is not installed: `make tools` (scripts/tools.sh) installs Debian's package valgrind", name)
		}
		return p
	}
	return look("valgrind"), look("callgrind_control")
}

// featureInstructions counts, for every variant, the instructions each of
// its two HAProxies executes per request, over dur of a keep-alive wrk run
// that has set up its connections before: the count starts once the run is
// steady, and the requests counted are those the destination answered in
// the window (CumReq). Two connections: each has its authorization checked
// again every second, a cost that the rate valgrind slows HAProxy to would
// spread over too few requests with more. The caller's health checks are
// off. A run with an error fails the benchmark.
func featureInstructions(b *testing.B, variants []*meshScenario, dur time.Duration) {
	valgrind, control := callgrindTools(b)
	bin := harness.HAProxyBinary(b)
	for _, v := range variants {
		p := v.variant.place(b, true)
		var procs []*harness.Process
		start := func(dir, cfg, addr string) int {
			path := harness.WriteFile(b, dir, "haproxy.cfg", cfg)
			proc := harness.Start(b, "callgrind "+filepath.Base(dir), valgrind, "--tool=callgrind",
				"--callgrind-out-file="+filepath.Join(dir, "callgrind.%p"), bin, "-db", "-f", path)
			procs = append(procs, proc)
			harness.WaitListening(b, addr, 60*time.Second)
			return proc.Cmd.Process.Pid
		}
		pids := map[string]int{"destination": start(p.dstDir, p.dst, p.inbound), "caller": start(p.srcDir, p.src, p.entry)}
		dirs := map[string]string{"destination": p.dstDir, "caller": p.srcDir}
		dstAdmin := haproxy.NewAdmin(filepath.Join(p.dstDir, "admin.sock"))
		harness.WaitFor(b, 60*time.Second, v.name+" answering under callgrind", func() bool {
			res := loadgen.RunWrk(context.Background(), loadgen.WrkConfig{Addr: p.entry, Conns: 1, Duration: time.Second})
			return res.Errors == 0 && res.Requests > 0
		})
		// One run: its connections (and their handshakes between the two
		// HAProxies) are set up in the first seconds, outside the count.
		warm := 3 * time.Second
		done := make(chan loadgen.Result, 1)
		go func() {
			done <- loadgen.RunWrk(context.Background(), loadgen.WrkConfig{Addr: p.entry, Conns: 2, Duration: warm + dur + 2*time.Second})
		}()
		time.Sleep(warm)
		for _, pid := range pids {
			callgrindControl(b, control, "-z", pid)
		}
		before := cumReq(b, dstAdmin)
		time.Sleep(dur)
		for _, pid := range pids {
			callgrindControl(b, control, "-d", pid)
		}
		requests := cumReq(b, dstAdmin) - before
		if res := <-done; res.Errors > 0 || res.Requests == 0 {
			b.Fatalf("%s under callgrind: %d requests, %d errors: %s", v.name, res.Requests, res.Errors, res.FirstError)
		}
		if requests < 100 {
			b.Fatalf("%s under callgrind: %d requests counted in %s, too few for a count", v.name, requests, dur)
		}
		v.instr = map[string]float64{}
		for side, pid := range pids {
			v.instr[side] = float64(callgrindTotal(b, dirs[side], pid)) / float64(requests)
		}
		b.Logf("instructions %-70s destination %.0f, caller %.0f a request (%d requests)", v.name, v.instr["destination"], v.instr["caller"], requests)
		for _, proc := range procs {
			proc.Kill()
		}
	}
}

var cumReqLine = regexp.MustCompile(`(?m)^CumReq: (\d+)`)

// cumReq is how many HTTP requests the HAProxy of admin has processed.
func cumReq(b testing.TB, admin *haproxy.Admin) int64 {
	out, err := admin.Command("show info")
	if err != nil {
		b.Fatalf("show info: %v", err)
	}
	m := cumReqLine.FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("show info without CumReq:\n%s", out)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// callgrindControl sends a command to the callgrind run of pid: -z zeroes
// its counts, -d dumps them (and zeroes them).
func callgrindControl(b testing.TB, control, cmd string, pid int) {
	if out, err := exec.Command(control, cmd, strconv.Itoa(pid)).CombinedOutput(); err != nil {
		b.Fatalf("callgrind_control %s %d: %v\n%s", cmd, pid, err, out)
	}
}

var callgrindSummary = regexp.MustCompile(`(?m)^(?:summary|totals): (\d+)`)

// callgrindTotal is the instruction count of pid's newest dump in dir.
func callgrindTotal(b testing.TB, dir string, pid int) int64 {
	var newest string
	var newestTime time.Time
	deadline := time.Now().Add(10 * time.Second)
	for newest == "" && time.Now().Before(deadline) {
		matches, _ := filepath.Glob(filepath.Join(dir, fmt.Sprintf("callgrind.%d.*", pid)))
		for _, m := range matches {
			if st, err := os.Stat(m); err == nil && st.ModTime().After(newestTime) {
				newest, newestTime = m, st.ModTime()
			}
		}
		if newest == "" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if newest == "" {
		b.Fatalf("no callgrind dump of pid %d in %s", pid, dir)
	}
	data, err := os.ReadFile(newest)
	if err != nil {
		b.Fatal(err)
	}
	m := callgrindSummary.FindSubmatch(data)
	if m == nil {
		b.Fatalf("%s: no summary line", newest)
	}
	n, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return n
}

// instrCost is what the feature variant v switches off costs in
// instructions per request (both sides), against F0.
func instrCost(all, v *meshScenario) float64 {
	return all.instr["destination"] + all.instr["caller"] - v.instr["destination"] - v.instr["caller"]
}

// instrColumns are a variant's instruction cells of the per-feature table.
func instrColumns(all, v *meshScenario) string {
	if v.instr == nil {
		return " - | - |"
	}
	cost := "-"
	if v != all {
		cost = fmt.Sprintf("%+.1fk", instrCost(all, v)/1000)
	}
	return fmt.Sprintf(" %.1fk + %.1fk | %s |", v.instr["destination"]/1000, v.instr["caller"]/1000, cost)
}
