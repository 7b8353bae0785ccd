package consulwatch

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// TestCompiledChainQuery asks a real agent for compiled chains: the raw
// body keeps what consul/api's types drop, a service with no entry is
// Default, the protocol override strips a router from a tcp upstream's
// chain (as Consul does for Envoy), and a blocking query wakes on a
// config entry write.
func TestCompiledChainQuery(t *testing.T) {
	c := harness.StartConsul(t)
	client, err := NewClient(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	must := func(ok bool, _ *api.WriteMeta, err error) {
		t.Helper()
		if err != nil || !ok {
			t.Fatalf("config entry: ok=%v err=%v", ok, err)
		}
	}
	q := CompiledChain{Service: "api"}
	raw, res, err := q.Fetch(client, &api.QueryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !raw.Default || res.Index == 0 {
		t.Fatalf("no config entry: default %v, index %d", raw.Default, res.Index)
	}

	// The blocking query wakes when the splitter is written.
	woke := make(chan RawChain, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		r, _, err := q.Fetch(client, (&api.QueryOptions{WaitIndex: res.Index, WaitTime: 15 * time.Second}).WithContext(ctx))
		if err != nil {
			t.Error(err)
		}
		woke <- r
	}()
	time.Sleep(200 * time.Millisecond)
	c.SetProtocol(t, "api", "http")
	must(client.ConfigEntries().Set(&api.ServiceResolverConfigEntry{Kind: api.ServiceResolver, Name: "api",
		Subsets: map[string]api.ServiceResolverSubset{"v1": {Filter: "Service.Meta.version == v1"}, "v2": {Filter: "Service.Meta.version == v2"}}}, nil))
	must(client.ConfigEntries().Set(&api.ServiceSplitterConfigEntry{Kind: api.ServiceSplitter, Name: "api",
		Splits: []api.ServiceSplit{{Weight: 90, ServiceSubset: "v1"},
			{Weight: 10, ServiceSubset: "v2", RequestHeaders: &api.HTTPHeaderModifiers{Set: map[string]string{"x-canary": "1"}}}}}, nil))
	var r RawChain
	select {
	case r = <-woke:
	case <-time.After(25 * time.Second):
		t.Fatal("the blocking query did not wake")
	}
	// The first write (service-defaults) may wake it: ask again.
	if r, _, err = q.Fetch(client, &api.QueryOptions{}); err != nil {
		t.Fatal(err)
	}
	if r.Default || !strings.Contains(string(r.Body), `"x-canary"`) {
		t.Fatalf("the split's request headers are not in the raw body: %s", r.Body)
	}

	// A tcp upstream: the override compiles the chain without the
	// splitter, to the resolver alone.
	tcp, _, err := CompiledChain{Service: "api", Protocol: "tcp", ConnectTimeout: 2 * time.Second}.Fetch(client, &api.QueryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var head struct {
		Chain struct {
			Protocol  string
			StartNode string
			Nodes     map[string]struct {
				Resolver *struct{ ConnectTimeout string }
			}
		}
	}
	if err := json.Unmarshal(tcp.Body, &head); err != nil {
		t.Fatal(err)
	}
	if head.Chain.Protocol != "tcp" || !strings.HasPrefix(head.Chain.StartNode, "resolver:") ||
		head.Chain.Nodes[head.Chain.StartNode].Resolver.ConnectTimeout != "2s" {
		t.Errorf("tcp override: %s", tcp.Body)
	}

	// A client not made by NewClient cannot keep the body: said.
	if _, _, err := q.Fetch(c.Client, &api.QueryOptions{}); err == nil || !strings.Contains(err.Error(), "NewClient") {
		t.Errorf("plain client: %v", err)
	}
}

// TestUpstreamHealthSubset filters a chain target's instances, and counts
// warning instances as healthy unless only passing ones are asked for.
func TestUpstreamHealthSubset(t *testing.T) {
	c := harness.StartConsul(t)
	agent := c.Client.Agent()
	for i, inst := range []struct {
		version, status string
	}{{"v1", api.HealthPassing}, {"v1", api.HealthWarning}, {"v1", api.HealthCritical}, {"v2", api.HealthPassing}} {
		id := "api-" + string(rune('a'+i))
		if err := agent.ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: "api", Port: 8080, Address: "127.0.0.1",
			Meta: map[string]string{"version": inst.version},
			Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: 21000 + i,
				Checks: api.AgentServiceChecks{{CheckID: id + "-proxy", TTL: "1h", Status: inst.status}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	// The agent syncs the catalog within a moment: wait for each answer.
	expect := func(what string, q UpstreamHealth, want ...int) {
		t.Helper()
		var got []int
		harness.WaitFor(t, 10*time.Second, what, func() bool {
			eps, _, err := q.Fetch(c.Client, &api.QueryOptions{})
			if err != nil {
				t.Fatal(err)
			}
			got = got[:0]
			for _, e := range eps {
				got = append(got, e.Port)
			}
			return slices.Equal(got, want)
		})
	}
	v1 := "Service.Meta.version == v1"
	expect("v1 with warning instances healthy: 21000 21001", UpstreamHealth{Service: "api", Filter: v1, WarningHealthy: true}, 21000, 21001)
	expect("v1 passing only: 21000", UpstreamHealth{Service: "api", Filter: v1}, 21000)
	expect("v2: 21003", UpstreamHealth{Service: "api", Filter: "Service.Meta.version == v2"}, 21003)
}
