package haproxy

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestHAProxyEnvironmentIsAllowListed starts a real HAProxy the way the
// exec launcher does, from an environment holding every kind of secret
// Consul, Nomad and Vault put there (and one nobody could list in advance),
// and reads the environment of its master and worker from /proc.
func TestHAProxyEnvironmentIsAllowListed(t *testing.T) {
	random := make([]byte, 16)
	_, _ = rand.Read(random)
	secrets := map[string]string{
		"CONSUL_HTTP_TOKEN": "consul-http-token-value",
		"CONSUL_HTTP_AUTH":  "operator:consul-basic-auth-password",
		"CONSUL_TOKEN":      "consul-token-value",
		"NOMAD_TOKEN":       "nomad-token-value",
		"VAULT_TOKEN":       "vault-token-value",
		"SECRET_X":          hex.EncodeToString(random),
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	t.Setenv("TZ", "UTC")

	dir := testDir(t)
	admin := filepath.Join(dir, "admin.sock")
	text := "global\n    stats socket " + admin + " mode 600 level admin expose-fd listeners\n" +
		"defaults\n    mode http\n    timeout client 5s\n    timeout connect 5s\n    timeout server 5s\n"
	p := startForTest(t, dir, admin, text)
	worker, err := p.admin.WorkerPid()
	if err != nil {
		t.Fatal(err)
	}

	for name, pid := range map[string]int{"master": p.cmd.Process.Pid, "worker": worker} {
		raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
		if err != nil {
			t.Fatal(err)
		}
		env := map[string]string{}
		for _, kv := range strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00") {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
		for k, v := range secrets {
			if strings.Contains(string(raw), v) {
				t.Errorf("haproxy %s (pid %d) holds %s in its environment", name, pid, k)
			}
		}
		// What is passed: PATH and TZ, plus what HAProxy sets itself.
		if env["PATH"] != os.Getenv("PATH") || env["TZ"] != "UTC" {
			t.Errorf("haproxy %s (pid %d): PATH=%q TZ=%q, want haconnect's", name, pid, env["PATH"], env["TZ"])
		}
		for k := range env {
			if k != "PATH" && k != "TZ" && !strings.HasPrefix(k, "HAPROXY_") {
				t.Errorf("haproxy %s (pid %d) got %s from haconnect's environment", name, pid, k)
			}
		}
	}
}

// TestEnvNeverInherits: an empty allow-listed environment must stay an
// empty one, not a nil Env, which exec.Cmd reads as "inherit everything".
func TestEnvNeverInherits(t *testing.T) {
	if env := Env([]string{"VAULT_TOKEN=x"}); env == nil || len(env) != 0 {
		t.Fatalf("Env = %#v, want an empty, non-nil list", env)
	}
}
