package loadgen

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, 100 on every Linux this runs on.
const clockTicks = 100

// CPUTime returns the user+system CPU time a process has used, from
// /proc/<pid>/stat (threads included).
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	_, rest, ok := strings.Cut(string(b), ") ")
	if !ok {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := strings.Fields(rest)
	if len(f) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// CPUMeter measures the CPU time of processes over a run.
type CPUMeter struct {
	pids  []int
	start []time.Duration
}

// StartCPU begins measuring pids.
func StartCPU(pids ...int) *CPUMeter {
	m := &CPUMeter{pids: pids}
	for _, p := range pids {
		t, _ := CPUTime(p)
		m.start = append(m.start, t)
	}
	return m
}

// Stop returns the CPU time each process used since StartCPU.
func (m *CPUMeter) Stop() []time.Duration {
	out := make([]time.Duration, len(m.pids))
	for i, p := range m.pids {
		t, _ := CPUTime(p)
		out[i] = t - m.start[i]
	}
	return out
}
