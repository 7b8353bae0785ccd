package consulwatch

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulflags"
)

// Query is one Consul endpoint that haconnect watches: a named type per
// endpoint, each yielding the value its watchers need.
type Query[T any] interface {
	// Name is how logs name what is watched, e.g. "intentions for api".
	Name() string
	// Endpoint is the HTTP path, which a refused token must be granted.
	Endpoint() string
	// Fetch runs the query once with q's blocking options.
	Fetch(c *api.Client, q *api.QueryOptions) (T, Result, error)
}

// ProxyRegistration is a Connect proxy's registration on the local agent
// (blocking by content hash).
type ProxyRegistration struct{ ProxyID string }

func (p ProxyRegistration) Name() string     { return "proxy registration " + p.ProxyID }
func (p ProxyRegistration) Endpoint() string { return "/v1/agent/service/" + p.ProxyID }
func (p ProxyRegistration) Fetch(c *api.Client, q *api.QueryOptions) (*api.AgentService, Result, error) {
	svc, meta, err := c.Agent().Service(p.ProxyID, q)
	if err != nil {
		return nil, Result{}, err
	}
	return svc, Result{Hash: meta.LastContentHash}, nil
}

// Leaf is a service's leaf certificate from the local agent.
type Leaf struct{ Service string }

func (l Leaf) Name() string     { return "leaf certificate of " + l.Service }
func (l Leaf) Endpoint() string { return "/v1/agent/connect/ca/leaf/" + l.Service }
func (l Leaf) Fetch(c *api.Client, q *api.QueryOptions) (*api.LeafCert, Result, error) {
	leaf, meta, err := c.Agent().ConnectCALeaf(l.Service, q)
	if err != nil {
		return nil, Result{}, err
	}
	return leaf, Result{Index: meta.LastIndex}, nil
}

// Roots are the Connect CA roots and the trust domain.
type Roots struct{}

func (Roots) Name() string     { return "CA roots" }
func (Roots) Endpoint() string { return "/v1/agent/connect/ca/roots" }
func (Roots) Fetch(c *api.Client, q *api.QueryOptions) (*api.CARootList, Result, error) {
	roots, meta, err := c.Agent().ConnectCARoots(q)
	if err != nil {
		return nil, Result{}, err
	}
	if roots.TrustDomain == "" {
		return nil, Result{}, fmt.Errorf("consul reports no trust domain (is Connect enabled?)")
	}
	return roots, Result{Index: meta.LastIndex}, nil
}

// IntentionsMatch are the intentions that apply to a destination, in
// Consul's precedence order.
type IntentionsMatch struct{ Destination string }

func (m IntentionsMatch) Name() string { return "intentions for " + m.Destination }
func (m IntentionsMatch) Endpoint() string {
	return "/v1/connect/intentions/match?by=destination&name=" + m.Destination
}
func (m IntentionsMatch) Fetch(c *api.Client, q *api.QueryOptions) ([]*api.Intention, Result, error) {
	res, meta, err := c.Connect().IntentionMatch(&api.IntentionMatch{
		By: api.IntentionMatchDestination, Names: []string{m.Destination},
	}, q)
	if err != nil {
		return nil, Result{}, err
	}
	return res[m.Destination], Result{Index: meta.LastIndex}, nil
}

// DiscoveryChain is a service's compiled discovery chain.
type DiscoveryChain struct{ Service string }

func (d DiscoveryChain) Name() string     { return "discovery chain of " + d.Service }
func (d DiscoveryChain) Endpoint() string { return "/v1/discovery-chain/" + d.Service }
func (d DiscoveryChain) Fetch(c *api.Client, q *api.QueryOptions) (*api.CompiledDiscoveryChain, Result, error) {
	res, meta, err := c.DiscoveryChain().Get(d.Service, nil, q)
	if err != nil {
		return nil, Result{}, err
	}
	return res.Chain, Result{Index: meta.LastIndex}, nil
}

// Endpoint is one healthy instance of an upstream's sidecar.
type Endpoint struct {
	Addr string
	Port int
	// Gateway names the terminating gateway this instance is, when Consul
	// answers with one for a service linked to it ("": a sidecar).
	Gateway string
}

// Key is the endpoint as host:port.
func (e Endpoint) Key() string { return fmt.Sprintf("%s:%d", e.Addr, e.Port) }

// UpstreamHealth are the healthy Connect-capable instances of a service
// (its sidecars), in a datacenter ("": the local one), sorted.
type UpstreamHealth struct {
	Service, Datacenter string
	// Filter keeps the instances a discovery chain target's subset selects
	// (Consul's filter expression; "": all).
	Filter string
	// WarningHealthy counts an instance whose checks warn as healthy, as
	// Envoy does for a chain target whose subset does not set
	// OnlyPassing; false: passing instances only.
	WarningHealthy bool
}

// healthEndpoint is the prefix of the upstream instances' endpoint.
const healthEndpoint = "/v1/health/connect/"

func (u UpstreamHealth) Name() string {
	n := "instances of " + u.Service
	if u.Datacenter != "" {
		n += "@" + u.Datacenter
	}
	if u.Filter != "" {
		n += " where " + u.Filter
	}
	return n
}
func (u UpstreamHealth) Endpoint() string { return healthEndpoint + u.Service }
func (u UpstreamHealth) Fetch(c *api.Client, q *api.QueryOptions) ([]Endpoint, Result, error) {
	q.Datacenter = u.Datacenter
	q.Filter = u.Filter
	entries, meta, err := c.Health().Connect(u.Service, "", !u.WarningHealthy, q)
	if err != nil {
		return nil, Result{}, err
	}
	if meta.ResultsFilteredByACLs {
		// Consul answers, but without the instances the token may not
		// see: rendering that would route to nobody.
		return nil, Result{}, fmt.Errorf("consul hides instances of %q from the ACL token: "+
			"it needs service:read on %q and %q and node:read on their nodes", u.Service, u.Service, u.Service+"-sidecar-proxy")
	}
	eps := make([]Endpoint, 0, len(entries))
	for _, e := range entries {
		if st := e.Checks.AggregatedStatus(); u.WarningHealthy && st != api.HealthPassing && st != api.HealthWarning {
			continue // asked for every instance: critical (and maintenance) ones are not healthy
		}
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		ep := Endpoint{Addr: addr, Port: e.Service.Port}
		if e.Service.Kind == api.ServiceKindTerminatingGateway {
			ep.Gateway = e.Service.Service
		}
		eps = append(eps, ep)
	}
	sort.Slice(eps, func(i, j int) bool { return eps[i].Key() < eps[j].Key() })
	return eps, Result{Index: meta.LastIndex}, nil
}

// ExplainRefusal adds what to fix to a watch's 403 error. Consul names the
// missing permission itself, except /v1/health/connect, which answers a
// bare "Permission denied" without service:read on the upstream.
func ExplainRefusal(endpoint string, err error) error {
	if name, ok := strings.CutPrefix(endpoint, healthEndpoint); ok && !strings.Contains(err.Error(), "lacks permission") {
		return consulflags.Explain(err, fmt.Sprintf("the token needs service:read on %q to call %s", name, endpoint))
	}
	return consulflags.Explain(err, "calling "+endpoint)
}

// Run keeps query current with blocking queries until ctx is done, and
// hands apply each answer that differs from the previous one (and the
// first). w's Fetch is set by Run; its other fields apply.
func Run[T any](ctx context.Context, c *api.Client, query Query[T], w Watch, apply func(T)) {
	var last Result
	first := true
	w.Fetch = func(_ context.Context, q *api.QueryOptions) (Result, error) {
		v, res, err := query.Fetch(c, q)
		if err != nil {
			return Result{}, err
		}
		if first || res != last {
			apply(v)
		}
		first, last = false, res
		return res, nil
	}
	w.Run(ctx)
}
