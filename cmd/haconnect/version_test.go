package main

import (
	"errors"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/haconnect/haconnect/internal/testkit/harness"
	"github.com/haconnect/haconnect/internal/version"
)

// versionLines is what `version` prints, line by line: the release, the
// commit (embedded by Go, or set by the Makefile, else unknown), the HAProxy
// release the configurations are written for, and the Consul API module.
func versionLines(name string) []*regexp.Regexp {
	return []*regexp.Regexp{
		regexp.MustCompile(`^` + regexp.QuoteMeta(name) + ` dev$`),
		regexp.MustCompile(`^Revision ([0-9a-f]{40}( \(modified\))?|unknown)$`),
		regexp.MustCompile(`^HAProxy ` + regexp.QuoteMeta(version.HAProxy) + `$`),
		regexp.MustCompile(`^Consul API v[0-9]+\.[0-9]+\.[0-9]+\S* \(github\.com/hashicorp/consul/api\)$`),
		regexp.MustCompile(`^Go go[0-9]`),
	}
}

func runBinary(t *testing.T, bin string, args ...string) (stdout string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("%s %v: %v", bin, args, err)
	}
	return out.String(), code
}

func TestVersionCommand(t *testing.T) {
	cases := []struct {
		bin, name string
		args      []string
	}{
		{"haconnect", "haconnect", []string{"version"}},
		{"haconnect", "haconnect", []string{"-version"}},
		{"haconnect-spoa", "haconnect-spoa", []string{"-version"}},
		{"haconnect", "haconnect-spoa", []string{"spoa", "-version"}},
	}
	for _, c := range cases {
		out, code := runBinary(t, harness.Binary(t, c.bin), c.args...)
		if code != 0 {
			t.Errorf("%s %v: exit %d, want 0", c.bin, c.args, code)
		}
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		want := versionLines(c.name)
		if len(lines) != len(want) {
			t.Errorf("%s %v printed %d lines, want %d:\n%s", c.bin, c.args, len(lines), len(want), out)
			continue
		}
		for i, re := range want {
			if !re.MatchString(lines[i]) {
				t.Errorf("%s %v line %d = %q, want %v", c.bin, c.args, i+1, lines[i], re)
			}
		}
	}
	// A bad flag or argument is still an error, not a version.
	for _, c := range []struct {
		bin  string
		args []string
	}{
		{"haconnect-spoa", []string{"-version", "-no-such-flag"}},
		{"haconnect", []string{"version", "extra"}},
		{"haconnect", []string{"-no-such-flag"}},
	} {
		if out, code := runBinary(t, harness.Binary(t, c.bin), c.args...); code == 0 || out != "" {
			t.Errorf("%s %v: exit %d, stdout %q; want a non-zero exit and no version", c.bin, c.args, code, out)
		}
	}
}

// TestVersionFromMakefile builds haconnect as the Makefile's build target
// does and checks that the release and commit it sets are printed.
func TestVersionFromMakefile(t *testing.T) {
	out, err := exec.Command("make", "-s", "-n", "-C", harness.RepoRoot(), "build", "VERSION=v9.8.7", "REVISION=0123456789abcdef0123456789abcdef01234567").Output()
	if err != nil {
		t.Fatalf("make -n build: %v", err)
	}
	m := regexp.MustCompile(`-ldflags "([^"]*)"`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("make build passes no -ldflags: %s", out)
	}
	bin := t.TempDir() + "/haconnect"
	build := exec.Command("go", "build", "-ldflags", m[1], "-o", bin, "./cmd/haconnect")
	build.Dir = harness.RepoRoot()
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	got, code := runBinary(t, bin, "version")
	if code != 0 || !strings.HasPrefix(got, "haconnect v9.8.7\nRevision ") {
		t.Fatalf("exit %d, printed:\n%s", code, got)
	}
	// Go's own record of the commit wins when it has one; without it the
	// Makefile's stands in.
	if rev := strings.SplitN(got, "\n", 3)[1]; rev != "Revision 0123456789abcdef0123456789abcdef01234567" &&
		!regexp.MustCompile(`^Revision [0-9a-f]{40}( \(modified\))?$`).MatchString(rev) {
		t.Fatalf("revision line %q", rev)
	}
}
