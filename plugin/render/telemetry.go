package render

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Latency buckets of haconnect_request_duration_seconds, in microseconds.
// The rendered rules count each request in one bucket (not cumulative) and
// lua/haconnect.lua accumulates them at scrape time.
var latencyBucketsUS = []int{500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 2500000, 10000000}

// The histogram's _sum is kept exactly, in one of two ways. HAProxy 2.6's
// stick counters can only be incremented, and a general purpose tag can
// be set to a value computed from its own (sc-set-gpt), which is exact
// only when no other thread writes the same entry in between:
//
//   - thread sums (the usual case): each thread adds each latency to its
//     own entry, "<thread>|<bucket>|<source>|<destination>" in SumTable,
//     tracked on sc1: gpt0 holds the low 30 bits of the sum in
//     microseconds, gpt1 the carries, and lua/haconnect.lua adds the
//     threads' entries up. The entry is also the latency bucket's: the
//     bucket is looked up in one map (LatencyMapText, map_int ranges)
//     and the entry's gpc0 counts the answers, so the bucket costs two
//     rules instead of one per bucket on the caller's entry (telemetry
//     measured 13.3k -> 11.1k instructions a request). Seven rules a
//     request.
//   - bit counters, when an instance or route rate limit holds sc1: for
//     every bit i of the latency a counter in the caller's entry counts
//     the requests whose latency has that bit set, and the sum is the sum
//     of count_i * 2^i. sumBits = 26 bits cover 67 s, one rule each.
const sumBits = 26

// SumTable is the thread sums' stick table, SumCarry the value at which
// gpt0 carries into gpt1 (the sum is gpt1 * SumCarry + gpt0).
const (
	SumTable = "haconnect_sums"
	SumCarry = 1 << 30
)

// LatencyMapText is the latency map file's content: each bucket's range
// of microseconds ("<lo>:<hi>") and its index (0-based). A latency beyond
// the last bucket, or negative (the wall clock stepped back), maps to
// len(latencyBucketsUS), which the scraper counts in +Inf only.
func (*Model) LatencyMapText() string {
	var b strings.Builder
	for i, r := range latencyRanges() {
		fmt.Fprintf(&b, "%d:%d %d\n", r.Lo, r.Hi, i)
	}
	return b.String()
}

// latencyRange is one latency bucket's microseconds, [Lo, Hi].
type latencyRange struct{ Lo, Hi int }

// latencyRanges are the buckets of latencyBucketsUS as ranges: each starts
// past the previous one's upper bound.
func latencyRanges() []latencyRange {
	out := make([]latencyRange, len(latencyBucketsUS))
	lo := 0
	for i, hi := range latencyBucketsUS {
		out[i] = latencyRange{lo, hi}
		lo = hi + 1
	}
	return out
}

// bucketRule is one latency bucket: counter Index counts latencies in
// [Lo, Hi] microseconds.
type bucketRule struct{ Index, Lo, Hi int }

// bitRule is one bit of the latency sum: counter Index counts latencies
// with Mask set.
type bitRule struct{ Index, Mask int }

// classRule counts the answers of one status class (1xx-5xx) in Index.
type classRule struct{ Index, Lo, Hi int }

// statusClasses is how many classes come first in a caller's entry.
const statusClasses = 5

// telemetry is the layout of the telemetry counters at the start of a
// caller's entry ("<source>|<destination>", see ratelimit.go): gpc0-4
// count the answers by status class, then one counter per latency
// bucket, then one per bit of the latency sum.
type telemetry struct {
	Classes   []classRule
	Buckets   []bucketRule
	Bits      []bitRule // bit counters' rules (none with thread sums)
	Counters  int       // gpc array size
	BucketsUS string    // for lua: comma-separated bounds
	SumBits   int
	// ThreadSums says the sum is kept by thread in SumTable (sc1).
	ThreadSums bool
	SumTable   string // "-" without thread sums (for lua)
	SumCarry   int
	SumMask    int // SumCarry - 1
	// LatencyMap is the latency buckets' map file (thread sums), Overflow
	// the bucket of a latency outside them.
	LatencyMap string
	Overflow   int
	Exporter   string // URL of HAProxy's exporter on the admin listener
}

// newTelemetry lays out the counters; threadSums when sc1 is free for the
// thread sums (no instance or route rate limit).
func newTelemetry(adminBind, latencyMap string, threadSums bool) telemetry {
	t := telemetry{ThreadSums: threadSums, SumTable: "-", SumCarry: SumCarry, SumMask: SumCarry - 1, LatencyMap: latencyMap, Overflow: len(latencyBucketsUS)}
	for c := 1; c <= statusClasses; c++ {
		t.Classes = append(t.Classes, classRule{Index: c - 1, Lo: c * 100, Hi: c*100 + 99})
	}
	var bounds []string
	for i, r := range latencyRanges() {
		// With thread sums the buckets are counted in SumTable; their
		// counters stay in the caller's entry (zero), so that the rate
		// limits' counters keep their place.
		if !threadSums {
			t.Buckets = append(t.Buckets, bucketRule{Index: statusClasses + i, Lo: r.Lo, Hi: r.Hi})
		}
		bounds = append(bounds, strconv.Itoa(r.Hi))
	}
	t.Counters = statusClasses + len(latencyBucketsUS)
	if threadSums {
		t.SumTable = SumTable
	} else {
		t.SumBits = sumBits
		for bit := 0; bit < sumBits; bit++ {
			t.Bits = append(t.Bits, bitRule{Index: t.Counters + bit, Mask: 1 << bit})
		}
		t.Counters += sumBits
	}
	t.BucketsUS = strings.Join(bounds, ",")
	if host, port, err := net.SplitHostPort(adminBind); err == nil {
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
		t.Exporter = "http://" + net.JoinHostPort(host, port) + "/metrics/haproxy"
	}
	return t
}
