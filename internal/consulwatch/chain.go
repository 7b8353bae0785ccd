package consulwatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/hashicorp/consul/api"
)

// CompiledChain is an upstream's discovery chain as Consul compiled it,
// returned as Consul's raw answer: consul/api's types drop fields a proxy
// must honour (a split's request headers, a resolver's request timeout),
// so the caller decodes the body itself (plugin/chain). The chain is
// compiled the way Consul compiles it for an Envoy sidecar's upstream:
// in the upstream's datacenter (compile-dc) and with the upstream's own
// protocol and connect timeout as overrides (Consul's proxycfg passes the
// upstream's Config protocol and connect_timeout_ms the same way), so a
// tcp upstream gets a chain without routers and splitters, as Envoy's.
//
// It needs a client made by NewClient, which keeps the body.
type CompiledChain struct {
	Service    string
	Datacenter string // compile-dc; "": the local datacenter
	// Protocol and ConnectTimeout override the chain's ("", 0: none).
	Protocol       string
	ConnectTimeout time.Duration
}

// RawChain is CompiledChain's answer.
type RawChain struct {
	Body []byte
	// Default: Consul compiled the chain from no service-resolver,
	// -splitter or -router entry (the service itself, as without a chain).
	Default bool
}

func (d CompiledChain) Name() string {
	if d.Datacenter == "" {
		return "discovery chain of " + d.Service
	}
	return "discovery chain of " + d.Service + "@" + d.Datacenter
}
func (d CompiledChain) Endpoint() string { return "/v1/discovery-chain/" + d.Service }
func (d CompiledChain) Fetch(c *api.Client, q *api.QueryOptions) (RawChain, Result, error) {
	capture := &bodyCapture{}
	q = q.WithContext(context.WithValue(q.Context(), captureKey{}, capture))
	opts := &api.DiscoveryChainOptions{EvaluateInDatacenter: d.Datacenter, OverrideProtocol: d.Protocol,
		OverrideConnectTimeout: d.ConnectTimeout}
	_, meta, err := c.DiscoveryChain().Get(d.Service, opts, q)
	if err != nil {
		return RawChain{}, Result{}, err
	}
	if capture.body == nil {
		return RawChain{}, Result{}, fmt.Errorf("discovery chain of %s: the Consul client keeps no answer body (make it with consulwatch.NewClient)", d.Service)
	}
	var head struct{ Chain *struct{ Default bool } }
	if err := json.Unmarshal(capture.body, &head); err != nil || head.Chain == nil {
		return RawChain{}, Result{}, fmt.Errorf("discovery chain of %s: no chain in Consul's answer (%v)", d.Service, err)
	}
	return RawChain{Body: capture.body, Default: head.Chain.Default}, Result{Index: meta.LastIndex}, nil
}

// NewClient is api.NewClient whose requests can keep their answer's raw
// body (CompiledChain): consul/api decodes every answer into its own
// types and gives no access to the body, nor a way to send compile-dc
// and a body on a blocking query other than its typed call. cfg is
// completed as api.NewClient completes it.
func NewClient(cfg *api.Config) (*api.Client, error) {
	if _, err := api.NewClient(cfg); err != nil { // fills in the defaults, the HTTP client, a unix socket's dialer
		return nil, err
	}
	c := *cfg
	hc := *cfg.HttpClient
	hc.Transport = capturingTransport{next: hc.Transport}
	c.HttpClient = &hc
	return api.NewClient(&c)
}

type captureKey struct{}

type bodyCapture struct{ body []byte }

// maxChainBody bounds a kept body: a compiled chain is a few kilobytes.
const maxChainBody = 8 << 20

// capturingTransport keeps the body of a successful answer to a request
// whose context carries a bodyCapture, and hands the same bytes on.
type capturingTransport struct{ next http.RoundTripper }

func (t capturingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	next := t.next
	if next == nil {
		next = http.DefaultTransport
	}
	resp, err := next.RoundTrip(req)
	capture, _ := req.Context().Value(captureKey{}).(*bodyCapture)
	if err != nil || capture == nil || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxChainBody+1))
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	if len(b) > maxChainBody {
		return nil, fmt.Errorf("%s: answer larger than %d bytes", req.URL.Path, maxChainBody)
	}
	capture.body = b
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp, nil
}
