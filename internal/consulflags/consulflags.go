// Package consulflags gives every haconnect command the same Consul client
// flags, with Consul's own environment variables as defaults
// (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT,
// CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME), as read by
// api.DefaultConfig, and, inside a Nomad task with no token given, the
// service identity token Nomad writes for Connect sidecars.
package consulflags

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/consul/api"
)

// Flags holds the values of the Consul flags.
type Flags struct {
	Addr          string
	Token         string
	TokenFile     string
	CAFile        string
	ClientCert    string
	ClientKey     string
	TLSServerName string

	// TokenOrigin says where Config found the ACL token ("" for none, as
	// with ACLs off): a flag, an environment variable, or Nomad's file.
	// Never the token itself.
	TokenOrigin string
}

// NomadServiceIdentityToken is the file, in a Nomad task's secrets
// directory, where Nomad writes the Consul token of a Connect sidecar
// task: the service identity token, derived from the service's workload
// identity in Nomad 1.7+ (and by the legacy SI token flow before it).
// Nomad's sids_hook.go writes it with mode 0440; Envoy's bootstrap reads
// it from there (envoy_bootstrap_hook.go maybeLoadSIToken). A task with
// its own Consul identity gets CONSUL_HTTP_TOKEN in its environment
// instead, read as any other Consul client does.
const NomadServiceIdentityToken = "si_token"

// Register adds the flags to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.Addr, "consul-addr", "", "Consul agent HTTP(S) address (default $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
	fs.StringVar(&f.Token, "token", "", "Consul ACL token (default $CONSUL_HTTP_TOKEN; in a Nomad task, then $NOMAD_SECRETS_DIR/si_token)")
	fs.StringVar(&f.TokenFile, "token-file", "", "file holding the Consul ACL token (default $CONSUL_HTTP_TOKEN_FILE)")
	fs.StringVar(&f.CAFile, "ca-file", "", "CA bundle to verify the agent's HTTPS certificate (default $CONSUL_CACERT)")
	fs.StringVar(&f.ClientCert, "client-cert", "", "client certificate for the agent's HTTPS (default $CONSUL_CLIENT_CERT)")
	fs.StringVar(&f.ClientKey, "client-key", "", "client key for the agent's HTTPS (default $CONSUL_CLIENT_KEY)")
	fs.StringVar(&f.TLSServerName, "tls-server-name", "", "server name to verify in the agent's certificate (default $CONSUL_TLS_SERVER_NAME)")
}

// Config builds the client configuration: environment first, flags over it.
// Files named by flags must be readable.
func (f *Flags) Config() (*api.Config, error) {
	cfg := api.DefaultConfig()
	if f.Addr != "" {
		addr := f.Addr
		if strings.Contains(addr, "://") {
			u, err := url.Parse(addr)
			if err != nil || u.Host == "" {
				return nil, fmt.Errorf("-consul-addr %q: not an address", f.Addr)
			}
			switch u.Scheme {
			case "http", "https":
				cfg.Scheme, addr = u.Scheme, u.Host
			case "unix":
				addr = f.Addr
			default:
				return nil, fmt.Errorf("-consul-addr %q: unknown scheme %q", f.Addr, u.Scheme)
			}
		}
		cfg.Address = addr
	}
	if f.Token != "" {
		cfg.Token = f.Token
	}
	if f.TokenFile != "" {
		cfg.TokenFile = f.TokenFile
	}
	if err := f.nomadToken(cfg); err != nil {
		return nil, err
	}
	for _, file := range []struct{ flag, path string }{
		{"-token-file", f.TokenFile}, {"-ca-file", f.CAFile},
		{"-client-cert", f.ClientCert}, {"-client-key", f.ClientKey},
	} {
		if file.path == "" {
			continue
		}
		if _, err := os.Stat(file.path); err != nil {
			return nil, fmt.Errorf("%s: %w", file.flag, err)
		}
	}
	if f.CAFile != "" {
		cfg.TLSConfig.CAFile = f.CAFile
	}
	if f.ClientCert != "" {
		cfg.TLSConfig.CertFile = f.ClientCert
	}
	if f.ClientKey != "" {
		cfg.TLSConfig.KeyFile = f.ClientKey
	}
	if f.TLSServerName != "" {
		cfg.TLSConfig.Address = f.TLSServerName
	}
	return cfg, nil
}

// nomadToken records where the token comes from and, when none is given
// by flag or environment inside a Nomad task, uses the service identity
// token Nomad wrote for the task, as Envoy's bootstrap does. A file that
// is there but unreadable is an error, not a silent run without a token.
func (f *Flags) nomadToken(cfg *api.Config) error {
	switch {
	case f.TokenFile != "":
		f.TokenOrigin = "-token-file"
		return nil
	case f.Token != "":
		f.TokenOrigin = "-token"
		return nil
	case cfg.TokenFile != "":
		f.TokenOrigin = "CONSUL_HTTP_TOKEN_FILE"
		return nil
	case cfg.Token != "":
		f.TokenOrigin = "CONSUL_HTTP_TOKEN"
		return nil
	}
	f.TokenOrigin = ""
	dir := os.Getenv("NOMAD_SECRETS_DIR")
	if dir == "" {
		return nil
	}
	path := filepath.Join(dir, NomadServiceIdentityToken)
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil // Consul ACLs off: Nomad writes no token
	case err != nil:
		return fmt.Errorf("reading the Consul token Nomad wrote for this task: %w "+
			"(Nomad writes it with mode 0440: run the task as the user that owns it, or give -token-file)", err)
	case strings.TrimSpace(string(data)) == "":
		return fmt.Errorf("the Consul token file Nomad wrote for this task, %s, is empty", path)
	}
	cfg.TokenFile = path
	f.TokenOrigin = "$NOMAD_SECRETS_DIR/" + NomadServiceIdentityToken
	return nil
}
