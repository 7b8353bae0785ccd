package harness

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Consul is a running Consul dev agent (server mode, Connect on, in memory).
type Consul struct {
	Addr   string // host:port of the HTTP API
	Client *api.Client
	Proc   *Process
}

// StartConsul starts a dev agent on free loopback ports and waits until it
// has a leader and a Connect CA. Extra HCL is appended to its configuration.
func StartConsul(t testing.TB, extraHCL ...string) *Consul {
	t.Helper()
	bin := ConsulBinary(t)
	httpPort := FreePort(t)
	hcl := fmt.Sprintf(`ports {
  http = %d
  https = -1
  dns = -1
  grpc = -1
  grpc_tls = -1
  serf_lan = %d
  serf_wan = %d
  server = %d
}
`, httpPort, FreePort(t), FreePort(t), FreePort(t))
	for _, h := range extraHCL {
		hcl += h + "\n"
	}
	c := &Consul{Addr: fmt.Sprintf("127.0.0.1:%d", httpPort)}
	c.Proc = Start(t, "consul", bin, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
		"-node", fmt.Sprintf("test-%d", httpPort), "-log-level", "warn", "-hcl", hcl)
	cfg := api.DefaultConfig()
	cfg.Address = c.Addr
	client, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Client = client
	WaitFor(t, 30*time.Second, "consul leader and Connect CA", func() bool {
		if c.Proc.Exited() {
			t.Fatalf("consul exited:\n%s", c.Proc.Output())
		}
		leader, err := client.Status().Leader()
		if err != nil || leader == "" {
			return false
		}
		roots, _, err := client.Agent().ConnectCARoots(nil)
		return err == nil && len(roots.Roots) > 0
	})
	return c
}

// Config returns a client configuration for this agent.
func (c *Consul) Config() *api.Config {
	cfg := api.DefaultConfig()
	cfg.Address = c.Addr
	return cfg
}

// SetIntentions replaces the intentions for destination: sources maps a
// source service (or "*") to "allow" or "deny".
func (c *Consul) SetIntentions(t testing.TB, destination string, sources ...*api.SourceIntention) {
	t.Helper()
	entry := &api.ServiceIntentionsConfigEntry{
		Kind:    api.ServiceIntentions,
		Name:    destination,
		Sources: sources,
	}
	if ok, _, err := c.Client.ConfigEntries().Set(entry, nil); err != nil || !ok {
		t.Fatalf("set intentions for %s: ok=%v err=%v", destination, ok, err)
	}
}

// Source builds one source of an intentions config entry.
func Source(name string, action api.IntentionAction) *api.SourceIntention {
	return &api.SourceIntention{Name: name, Action: action}
}

// DeleteIntentions removes every intention for destination.
func (c *Consul) DeleteIntentions(t testing.TB, destination string) {
	t.Helper()
	if _, err := c.Client.ConfigEntries().Delete(api.ServiceIntentions, destination, nil); err != nil {
		t.Fatalf("delete intentions for %s: %v", destination, err)
	}
}

// SetProtocol writes the service-defaults of service with the given
// protocol (http, tcp, ...).
func (c *Consul) SetProtocol(t testing.TB, service, protocol string) {
	t.Helper()
	entry := &api.ServiceConfigEntry{Kind: api.ServiceDefaults, Name: service, Protocol: protocol}
	if ok, _, err := c.Client.ConfigEntries().Set(entry, nil); err != nil || !ok {
		t.Fatalf("set service-defaults for %s: ok=%v err=%v", service, ok, err)
	}
}
