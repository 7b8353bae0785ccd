package render

import (
	"net"
	"strconv"
	"strings"
)

// Latency buckets of haconnect_request_duration_seconds, in microseconds.
// The rendered rules count each request in one bucket (not cumulative) and
// lua/haconnect.lua accumulates them at scrape time.
var latencyBucketsUS = []int{500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 2500000, 10000000}

// sumBits is how many bits of a latency in microseconds are counted to
// rebuild the histogram's _sum exactly: HAProxy 2.6's stick counters can
// only be incremented, so for every bit i a counter counts the requests
// whose latency has that bit set, and the sum is the sum of count_i * 2^i.
// 26 bits cover 67 s.
const sumBits = 26

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
	Bits      []bitRule
	Counters  int    // gpc array size
	BucketsUS string // for lua: comma-separated bounds
	SumBits   int
	Exporter  string // URL of HAProxy's exporter on the admin listener
}

func newTelemetry(adminBind string) telemetry {
	t := telemetry{SumBits: sumBits}
	for c := 1; c <= statusClasses; c++ {
		t.Classes = append(t.Classes, classRule{Index: c - 1, Lo: c * 100, Hi: c*100 + 99})
	}
	lo := 0
	var bounds []string
	for i, hi := range latencyBucketsUS {
		t.Buckets = append(t.Buckets, bucketRule{Index: statusClasses + i, Lo: lo, Hi: hi})
		bounds = append(bounds, strconv.Itoa(hi))
		lo = hi + 1
	}
	for bit := 0; bit < sumBits; bit++ {
		t.Bits = append(t.Bits, bitRule{Index: statusClasses + len(latencyBucketsUS) + bit, Mask: 1 << bit})
	}
	t.Counters = statusClasses + len(latencyBucketsUS) + sumBits
	t.BucketsUS = strings.Join(bounds, ",")
	if host, port, err := net.SplitHostPort(adminBind); err == nil {
		if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
			host = "127.0.0.1"
		}
		t.Exporter = "http://" + net.JoinHostPort(host, port) + "/metrics/haproxy"
	}
	return t
}
