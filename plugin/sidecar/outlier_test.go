package sidecar

import (
	"testing"

	"github.com/haconnect/haconnect/plugin/haproxy"
	"github.com/haconnect/haconnect/plugin/render"
)

func TestJudgeOutliers(t *testing.T) {
	watched := map[string]*render.PassiveHealth{"upstream_api": {MaxFailures: 3, EjectSeconds: 30, MaxEjectionPercent: 10}}
	stat := func(server, status string, retries, fivexx, ok int64) haproxy.ServerStat {
		return haproxy.ServerStat{Backend: "upstream_api", Server: server, Status: status, Retries: retries, Responses5xx: fivexx, ResponsesOK: ok}
	}
	sweep := func(last map[string]outlierCounts, stats ...haproxy.ServerStat) (map[string]outlierCounts, []string) {
		next, vs := judgeOutliers(watched, stats, last)
		var out []string
		for _, v := range vs {
			if v.eject {
				out = append(out, "eject "+v.Server)
			} else {
				out = append(out, "spare "+v.Server)
			}
		}
		return next, out
	}
	// First sweep: a baseline only.
	c, v := sweep(nil, stat("s1", "UP", 0, 0, 10), stat("s2", "UP", 5, 0, 0), stat("s3", "UP", 0, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if v != nil {
		t.Fatalf("first sweep judged %v", v)
	}
	// Two failures, then one more in the next sweep: consecutive across
	// sweeps, s2 is taken out on the third.
	c, v = sweep(c, stat("s1", "UP", 0, 0, 20), stat("s2", "UP", 6, 1, 0), stat("s3", "UP", 0, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if v != nil {
		t.Fatalf("two failures judged %v", v)
	}
	c, v = sweep(c, stat("s1", "UP", 0, 0, 30), stat("s2", "UP", 7, 1, 0), stat("s3", "UP", 0, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if len(v) != 1 || v[0] != "eject s2" {
		t.Fatalf("third consecutive failure: %v, want s2 taken out", v)
	}
	// s3 fails as much while s2 is down: 10% of three instances is less
	// than one, so only one may be out: s3 stays, said once.
	c, v = sweep(c, stat("s1", "UP", 0, 0, 40), stat("s2", "DOWN", 7, 1, 0), stat("s3", "UP", 4, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if len(v) != 1 || v[0] != "spare s3" {
		t.Fatalf("a second failing instance: %v, want it spared (max_ejection_percent)", v)
	}
	c, v = sweep(c, stat("s1", "UP", 0, 0, 50), stat("s2", "DOWN", 7, 1, 0), stat("s3", "UP", 6, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if v != nil {
		t.Fatalf("the spared instance was judged again: %v", v)
	}
	// A success in between resets the count; a reload's lower counters are
	// a new baseline.
	c, v = sweep(c, stat("s1", "UP", 2, 0, 51), stat("s2", "UP", 7, 1, 0), stat("s3", "UP", 0, 0, 0), stat("s4", "MAINT", 0, 0, 0))
	if v != nil {
		t.Fatalf("after a reload: %v", v)
	}
	if got := c["upstream_api/s1"].streak; got != 0 {
		t.Fatalf("s1 had successes: streak %d", got)
	}
}
