package consulflags

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
