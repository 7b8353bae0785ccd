package loadgen

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// CoreMeter measures how busy each CPU of the machine was over a run,
// from /proc/stat: whatever ran there, the processes under test or not.
type CoreMeter struct{ start map[int][2]uint64 }

// StartCores begins measuring every CPU.
func StartCores() *CoreMeter { return &CoreMeter{start: coreTimes()} }

// Stop returns each CPU's busy fraction (0..1) since StartCores.
func (m *CoreMeter) Stop() map[int]float64 {
	out := map[int]float64{}
	for cpu, end := range coreTimes() {
		s, ok := m.start[cpu]
		if !ok || end[1] <= s[1] {
			continue
		}
		out[cpu] = float64(end[0]-s[0]) / float64(end[1]-s[1])
	}
	return out
}

// coreTimes reads each CPU's busy and total jiffies.
func coreTimes() map[int][2]uint64 {
	out := map[int][2]uint64{}
	f, err := os.Open("/proc/stat")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || !strings.HasPrefix(fields[0], "cpu") || fields[0] == "cpu" {
			continue
		}
		cpu, err := strconv.Atoi(strings.TrimPrefix(fields[0], "cpu"))
		if err != nil {
			continue
		}
		var busy, total uint64
		for i, v := range fields[1:] {
			n, _ := strconv.ParseUint(v, 10, 64)
			if i >= 8 { // guest time is already in user time
				break
			}
			total += n
			if i != 3 && i != 4 { // idle, iowait
				busy += n
			}
		}
		out[cpu] = [2]uint64{busy, total}
	}
	return out
}
