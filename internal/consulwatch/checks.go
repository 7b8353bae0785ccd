package consulwatch

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// GRPCHealthPath is the path every gRPC health check calls: what Consul
// exposes for a gRPC check (agent/xds/listeners.go, parseCheckPath).
const GRPCHealthPath = "/grpc.health.v1.Health/Check"

// ExposedCheck is one HTTP or gRPC check of a service that the local
// Consul agent sends to the service's proxy because the proxy registered
// Proxy.Expose.Checks = true.
//
// How Consul does it (agent/agent.go, rerouteExposedChecks and addCheck):
// the agent gives each such check a port from expose_min_port ..
// expose_max_port (default 21500-21755; listenerPortLocked), rewrites the
// check's target to the proxy's registered Address on that port
// (httpInjectAddr keeps the URL's path; grpcInjectAddr the gRPC service)
// and records the port as the check's ExposedPort.
//
// What the agent's HTTP API tells a proxy that is not Envoy: ExposedPort
// and Type in /v1/agent/checks, but not the check's original target
// (Definition is empty there, and in /v1/health/checks, on Consul 1.16).
// Envoy gets path and local port over xDS instead. So:
//   - the path of an HTTP check is read from the check's Output, which
//     names the URL the agent called ("HTTP GET http://<addr>:<port>/path:
//     ..." or `Get "http://...": ...`); until the check ran once it is not
//     known, and the check is not exposed;
//   - a gRPC check's path is always GRPCHealthPath;
//   - the local port is not known at all: the caller uses the proxy's
//     LocalServicePort.
type ExposedCheck struct {
	CheckID     string
	Type        string // "http" or "grpc"
	ExposedPort int
	Path        string // "" while not known
}

// ExposedChecks is the answer of an ExposedChecksQuery.
type ExposedChecks struct {
	Checks []ExposedCheck // by CheckID
	// AgentAddr is the agent's LAN address: besides loopback, the only
	// source a check listener admits (as Envoy's).
	AgentAddr string
}

// ExposedChecksQuery polls the local agent for the exposed checks of one
// service instance: /v1/agent/checks does not block, so it is asked every
// Poll (default 1s; the agent answers from memory). Use one value per
// watch: it remembers the paths it has read.
type ExposedChecksQuery struct {
	ServiceID string
	Poll      time.Duration

	mu        sync.Mutex
	agentAddr string
	paths     map[string]string // "<check ID>|<exposed port>" -> path
}

func (q *ExposedChecksQuery) Name() string     { return "exposed checks of " + q.ServiceID }
func (q *ExposedChecksQuery) Endpoint() string { return "/v1/agent/checks" }

// urlInOutput finds the URLs in a check's output.
var urlInOutput = regexp.MustCompile(`https?://[^\s"]+`)

func (q *ExposedChecksQuery) Fetch(c *api.Client, o *api.QueryOptions) (*ExposedChecks, Result, error) {
	ctx := o.Context()
	if o.WaitHash != "" { // a poll, not the first call: wait first
		poll := q.Poll
		if poll <= 0 {
			poll = time.Second
		}
		select {
		case <-ctx.Done():
			return nil, Result{}, ctx.Err()
		case <-time.After(poll):
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.agentAddr == "" {
		addr, err := agentLANAddr(c)
		if err != nil {
			return nil, Result{}, err
		}
		q.agentAddr = addr
	}
	checks, err := c.Agent().ChecksWithFilterOpts(fmt.Sprintf("ServiceID == %q", q.ServiceID),
		(&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, Result{}, err
	}
	out := &ExposedChecks{AgentAddr: q.agentAddr}
	known := map[string]string{}
	for id, ch := range checks {
		if ch.ExposedPort == 0 || (ch.Type != "http" && ch.Type != "grpc") {
			continue
		}
		e := ExposedCheck{CheckID: id, Type: ch.Type, ExposedPort: ch.ExposedPort}
		key := id + "|" + strconv.Itoa(ch.ExposedPort)
		switch {
		case ch.Type == "grpc":
			e.Path = GRPCHealthPath
		case q.paths[key] != "":
			// Kept once read: a later output without the URL (an agent
			// restart, a truncated body) must not take the path away.
			e.Path = q.paths[key]
		default:
			e.Path = pathInOutput(ch.Output, ch.ExposedPort)
		}
		if e.Path != "" && ch.Type == "http" {
			known[key] = e.Path
		}
		out.Checks = append(out.Checks, e)
	}
	q.paths = known // checks gone (or moved to another port) are forgotten
	sort.Slice(out.Checks, func(i, j int) bool { return out.Checks[i].CheckID < out.Checks[j].CheckID })
	h := sha256.Sum256(fmt.Appendf(nil, "%q %+v", out.AgentAddr, out.Checks))
	return out, Result{Hash: hex.EncodeToString(h[:])}, nil
}

// pathInOutput is the path of the first URL in output on port, "" if
// none. Consul writes the URL as `HTTP GET <url>: <status>` after an
// answer and as `Get "<url>": <error>` after a failure.
func pathInOutput(output string, port int) string {
	for _, loc := range urlInOutput.FindAllStringIndex(output, -1) {
		s := output[loc[0]:loc[1]]
		if quoted := loc[1] < len(output) && output[loc[1]] == '"'; !quoted && s[len(s)-1] == ':' {
			s = s[:len(s)-1]
		}
		u, err := url.Parse(s)
		if err != nil || u.Port() != strconv.Itoa(port) {
			continue
		}
		if p := u.EscapedPath(); p != "" {
			return p
		}
		return "/"
	}
	return ""
}

// agentLANAddr is the local agent's LAN address (/v1/agent/self
// Member.Addr, the address Envoy's check listeners admit besides loopback).
func agentLANAddr(c *api.Client) (string, error) {
	self, err := c.Agent().Self()
	if err != nil {
		return "", err
	}
	addr, _ := self["Member"]["Addr"].(string)
	if net.ParseIP(addr) == nil {
		return "", fmt.Errorf("the agent reports no LAN address (Member.Addr %q)", addr)
	}
	return addr, nil
}
