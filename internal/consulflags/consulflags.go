// Package consulflags gives every haconnect command the same Consul client
// flags, with Consul's own environment variables as defaults
// (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT,
// CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME), as read by
// api.DefaultConfig.
package consulflags

import (
	"flag"
	"fmt"
	"net/url"
	"os"
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
}

// Register adds the flags to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.Addr, "consul-addr", "", "Consul agent HTTP(S) address (default $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
	fs.StringVar(&f.Token, "token", "", "Consul ACL token (default $CONSUL_HTTP_TOKEN)")
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
