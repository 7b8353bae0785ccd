package harness

import (
	"crypto/rand"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Consul is a running Consul dev agent (server mode, Connect on, in memory).
type Consul struct {
	Addr   string      // host:port of the HTTP API (HTTPS with TLS)
	Client *api.Client // administers the agent (with the management token)
	Proc   *Process
	// Token is the management token, when ACLs are on.
	Token string
	// TLS is what a client needs for the agent's HTTPS; nil: plain HTTP.
	TLS *api.TLSConfig
}

// StartConsul starts a dev agent on free loopback ports and waits until it
// has a leader and a Connect CA. Extra HCL is appended to its configuration.
func StartConsul(t testing.TB, extraHCL ...string) *Consul {
	t.Helper()
	return startConsul(t, &Consul{}, extraHCL...)
}

// secureServerName is the only name in the secure agent's certificate, so
// that every client must be told it (CONSUL_TLS_SERVER_NAME): it also holds
// when clients reach the agent through a proxy such as a Cutter.
const secureServerName = "consul.haconnect.test"

// StartSecureConsul starts a dev agent as production runs it: ACLs on with
// default deny, and the API on HTTPS only, with a certificate from a test
// CA and client certificates required. Its Client holds the management
// token; CreateToken makes tokens with less.
func StartSecureConsul(t testing.TB, extraHCL ...string) *Consul {
	t.Helper()
	dir := TempDir(t)
	ca := NewForeignCA(t)
	server := ca.IssueHost(t, "consul agent", secureServerName)
	client := ca.IssueHost(t, "haconnect test client")
	c := &Consul{
		Token: newUUID(t),
		TLS: &api.TLSConfig{
			Address:  secureServerName,
			CAFile:   WriteFile(t, dir, "consul-ca.pem", ca.CertPEM),
			CertFile: WriteFile(t, dir, "consul-client.pem", client.CertPEM),
			KeyFile:  WriteFile(t, dir, "consul-client-key.pem", client.KeyPEM),
		},
	}
	// The management token is also the agent token, so that the agent may
	// register its node and sync services (anti-entropy).
	hcl := fmt.Sprintf(`acl {
  enabled = true
  default_policy = "deny"
  enable_token_persistence = false
  tokens {
    initial_management = %q
    agent = %q
  }
}
tls {
  defaults {
    ca_file = %q
    cert_file = %q
    key_file = %q
  }
  https {
    verify_incoming = true
  }
}
`, c.Token, c.Token, c.TLS.CAFile, WriteFile(t, dir, "consul-server.pem", server.CertPEM),
		WriteFile(t, dir, "consul-server-key.pem", server.KeyPEM))
	return startConsul(t, c, append([]string{hcl}, extraHCL...)...)
}

func startConsul(t testing.TB, c *Consul, extraHCL ...string) *Consul {
	t.Helper()
	bin := ConsulBinary(t)
	port := FreePort(t)
	httpPort, httpsPort := port, -1
	if c.TLS != nil {
		httpPort, httpsPort = -1, port
	}
	hcl := fmt.Sprintf(`ports {
  http = %d
  https = %d
  dns = -1
  grpc = -1
  grpc_tls = -1
  serf_lan = %d
  serf_wan = %d
  server = %d
}
`, httpPort, httpsPort, FreePort(t), FreePort(t), FreePort(t))
	for _, h := range extraHCL {
		hcl += h + "\n"
	}
	c.Addr = fmt.Sprintf("127.0.0.1:%d", port)
	c.Proc = Start(t, "consul", bin, "agent", "-dev", "-client", "127.0.0.1", "-bind", "127.0.0.1",
		"-node", fmt.Sprintf("test-%d", port), "-log-level", "warn", "-hcl", hcl)
	client, err := api.NewClient(c.Config())
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

// Config returns a client configuration for this agent, with the
// management token and the HTTPS settings when it has them.
func (c *Consul) Config() *api.Config {
	cfg := api.DefaultConfig()
	cfg.Address = c.Addr
	if c.Token != "" {
		cfg.Token = c.Token
	}
	if c.TLS != nil {
		cfg.Scheme = "https"
		cfg.TLSConfig = *c.TLS
	}
	return cfg
}

// Flags returns the haconnect command-line flags that reach this agent at
// addr (c.Addr, or a proxy in front of it) with token ("": no -token).
func (c *Consul) Flags(addr, token string) []string {
	args := []string{"-consul-addr", addr}
	if c.TLS != nil {
		args = []string{"-consul-addr", "https://" + addr, "-ca-file", c.TLS.CAFile,
			"-client-cert", c.TLS.CertFile, "-client-key", c.TLS.KeyFile, "-tls-server-name", c.TLS.Address}
	}
	if token != "" {
		args = append(args, "-token", token)
	}
	return args
}

// Env is Flags as Consul's environment variables ("K=V").
func (c *Consul) Env(addr, token string) []string {
	env := []string{"CONSUL_HTTP_ADDR=" + addr}
	if c.TLS != nil {
		env = []string{"CONSUL_HTTP_ADDR=https://" + addr, "CONSUL_CACERT=" + c.TLS.CAFile,
			"CONSUL_CLIENT_CERT=" + c.TLS.CertFile, "CONSUL_CLIENT_KEY=" + c.TLS.KeyFile,
			"CONSUL_TLS_SERVER_NAME=" + c.TLS.Address}
	}
	if token != "" {
		env = append(env, "CONSUL_HTTP_TOKEN="+token)
	}
	return env
}

// CreateToken creates an ACL policy from rules (HCL) and a token that holds
// only that policy (no rules: a token without any policy).
func (c *Consul) CreateToken(t testing.TB, name, rules string) *api.ACLToken {
	t.Helper()
	var links []*api.ACLTokenPolicyLink
	if strings.TrimSpace(rules) != "" {
		policy, _, err := c.Client.ACL().PolicyCreate(&api.ACLPolicy{Name: name, Rules: rules}, nil)
		if err != nil {
			t.Fatalf("create ACL policy %s: %v", name, err)
		}
		links = append(links, &api.ACLTokenPolicyLink{ID: policy.ID})
	}
	token, _, err := c.Client.ACL().TokenCreate(&api.ACLToken{Description: name, Policies: links}, nil)
	if err != nil {
		t.Fatalf("create ACL token %s: %v", name, err)
	}
	return token
}

// newUUID returns a random UUID (version 4), the form of ACL secrets.
func newUUID(t testing.TB) string {
	t.Helper()
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
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
