package consulflags

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

func parse(t *testing.T, args ...string) (*Flags, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	var f Flags
	f.Register(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	_, err := f.Config()
	return &f, err
}

func TestConfigFromFlagsAndEnvironment(t *testing.T) {
	t.Setenv("CONSUL_HTTP_ADDR", "10.0.0.1:8500")
	t.Setenv("CONSUL_HTTP_TOKEN", "from-env")
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	var f Flags
	f.Register(fs)
	_ = fs.Parse(nil)
	cfg, err := f.Config()
	if err != nil || cfg.Address != "10.0.0.1:8500" || cfg.Token != "from-env" {
		t.Fatalf("environment not used: %+v %v", cfg, err)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	_ = os.WriteFile(ca, []byte("x"), 0o600)
	_ = fs.Parse([]string{"-consul-addr", "https://consul.local:8501", "-token", "from-flag", "-ca-file", ca})
	cfg, err = f.Config()
	if err != nil || cfg.Address != "consul.local:8501" || cfg.Scheme != "https" || cfg.Token != "from-flag" || cfg.TLSConfig.CAFile != ca {
		t.Fatalf("flags not applied: %+v %v", cfg, err)
	}
}

func TestConfigRejectsBadValues(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-consul-addr", "ftp://x:1"}, "unknown scheme"},
		{[]string{"-consul-addr", "http://"}, "not an address"},
		{[]string{"-token-file", "/nonexistent/token"}, "-token-file"},
		{[]string{"-client-key", "/nonexistent/key"}, "-client-key"},
	} {
		if _, err := parse(t, tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want one mentioning %q", tc.args, err, tc.want)
		}
	}
}

func TestExplain(t *testing.T) {
	lacks := api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID 'a1' lacks permission 'intention:read' on "api"`}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{lacks, lacks.Error() + " (calling /v1/connect/intentions/match?by=destination&name=api)"},
		{api.StatusError{Code: 403, Body: "ACL not found"}, "Unexpected response code: 403 (ACL not found) (" + UnknownTokenHint + ")"},
		{api.StatusError{Code: 500, Body: "rpc error"}, "Unexpected response code: 500 (rpc error)"},
	} {
		got := Explain(tc.err, "calling /v1/connect/intentions/match?by=destination&name=api")
		if got.Error() != tc.want || !errors.Is(got, tc.err) {
			t.Errorf("Explain(%v)\n got %s\nwant %s", tc.err, got, tc.want)
		}
	}
}

// Inside a Nomad Connect sidecar task with Consul ACLs on, the only token
// is the one Nomad wrote to ${NOMAD_SECRETS_DIR}/si_token (sids_hook.go,
// mode 0440); a token given by flag or environment comes first.
func TestNomadServiceIdentityToken(t *testing.T) {
	t.Setenv("CONSUL_HTTP_TOKEN", "")
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", "")
	secrets := t.TempDir()
	t.Setenv("NOMAD_SECRETS_DIR", secrets)
	config := func(args ...string) (*api.Config, *Flags, error) {
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		var f Flags
		f.Register(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		cfg, err := f.Config()
		return cfg, &f, err
	}

	// No file: Consul ACLs are off, no token.
	cfg, f, err := config()
	if err != nil || cfg.TokenFile != "" || f.TokenOrigin != "" {
		t.Fatalf("no si_token: %+v origin %q err %v", cfg, f.TokenOrigin, err)
	}

	path := filepath.Join(secrets, "si_token")
	if err := os.WriteFile(path, []byte("d2d2e1a5-si\n"), 0o440); err != nil {
		t.Fatal(err)
	}
	cfg, f, err = config()
	if err != nil || cfg.TokenFile != path || f.TokenOrigin != "$NOMAD_SECRETS_DIR/si_token" {
		t.Fatalf("si_token not used: %+v origin %q err %v", cfg, f.TokenOrigin, err)
	}
	// The client reads the file and sends what it holds.
	if _, err := api.NewClient(cfg); err != nil || cfg.Token != "d2d2e1a5-si" {
		t.Fatalf("client token %q from %s: %v", cfg.Token, cfg.TokenFile, err)
	}

	// A flag, or Consul's own environment, wins.
	if cfg, f, err = config("-token", "from-flag"); err != nil || cfg.Token != "from-flag" || cfg.TokenFile != "" || f.TokenOrigin != "-token" {
		t.Fatalf("-token not preferred: %+v origin %q err %v", cfg, f.TokenOrigin, err)
	}
	t.Setenv("CONSUL_HTTP_TOKEN", "from-env")
	if cfg, f, err = config(); err != nil || cfg.Token != "from-env" || cfg.TokenFile != "" || f.TokenOrigin != "CONSUL_HTTP_TOKEN" {
		t.Fatalf("CONSUL_HTTP_TOKEN not preferred: %+v origin %q err %v", cfg, f.TokenOrigin, err)
	}
	t.Setenv("CONSUL_HTTP_TOKEN", "")

	// There but empty or unreadable: a clear error, not a run without a token.
	if err := os.WriteFile(path, []byte(" \n"), 0o440); err != nil {
		t.Fatal(err)
	}
	if _, _, err = config(); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Fatalf("empty si_token: err %v", err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o700); err != nil { // reading a directory fails for root too
		t.Fatal(err)
	}
	if _, _, err = config(); err == nil || !strings.Contains(err.Error(), "reading the Consul token Nomad wrote") {
		t.Fatalf("unreadable si_token: err %v", err)
	}
}
