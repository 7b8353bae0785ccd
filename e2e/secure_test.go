package e2e

import (
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// Production Consul runs with ACLs (default deny) and often HTTPS on the
// agent. These tests run the standalone and sidecar scenarios against such
// an agent (harness.StartSecureConsul), every haconnect process holding the
// least-privileged token documented in docs/acl, and check that no token
// ever reaches a log line.

// readPolicy reads a documented ACL policy (docs/acl/<name>).
func readPolicy(t *testing.T, name string) string {
	t.Helper()
	return readRepoFile(t, "docs", "acl", name)
}

// sidecarPolicies returns docs/acl/sidecar.hcl (written for the service web
// with the upstream api) as it is, and adapted to the service api with no
// upstream: renamed, without the upstream rules.
func sidecarPolicies(t *testing.T) (web, api string) {
	t.Helper()
	web = readPolicy(t, "sidecar.hcl")
	own, _, found := strings.Cut(web, "# Each upstream")
	if !found {
		t.Fatal(`docs/acl/sidecar.hcl: no "# Each upstream" section`)
	}
	return web, strings.ReplaceAll(own, `"web`, `"api`)
}

// logText is what p printed, with the quotes hclog escapes in values
// unescaped.
func logText(p *harness.Process) string { return strings.ReplaceAll(p.Output(), `\"`, `"`) }

// noSecrets fails if any secret appears in what the processes printed or
// in a file under dirs.
func noSecrets(t *testing.T, secrets []string, procs []*harness.Process, dirs ...string) {
	t.Helper()
	for _, p := range procs {
		out := p.Output()
		for _, s := range secrets {
			if strings.Contains(out, s) {
				t.Errorf("%s printed an ACL token's SecretID", p.Cmd.Path)
			}
		}
	}
	for _, dir := range dirs {
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			b, _ := os.ReadFile(path)
			for _, s := range secrets {
				if strings.Contains(string(b), s) {
					t.Errorf("%s holds an ACL token's SecretID", path)
				}
			}
			return nil
		})
	}
}

// deletedToken returns the SecretID of a token that existed and was
// deleted, as a revoked token is: Consul answers "ACL not found".
func deletedToken(t *testing.T, c *harness.Consul) string {
	t.Helper()
	tok := c.CreateToken(t, "deleted", "")
	if _, err := c.Client.ACL().TokenDelete(tok.AccessorID, nil); err != nil {
		t.Fatal(err)
	}
	return tok.SecretID
}

func TestSecureStandalone(t *testing.T) {
	c := harness.StartSecureConsul(t)
	// No wildcard: a caller no intention names falls to the ACL default
	// policy, which only the authorize endpoint reports (service:write).
	c.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("batch", deny))
	tok := c.CreateToken(t, "spoa", readPolicy(t, "spoa.hcl"))
	s := startStandaloneOn(t, c, tok.SecretID, 5*time.Minute)
	secrets := []string{c.Token, tok.SecretID}
	procs := []*harness.Process{s.haproxy.Proc, s.spoa}
	top := t
	restart := func(t *testing.T, args, env []string) {
		t.Helper()
		s.spoa.Kill()
		s.consulArgs, s.spoaEnv = args, env
		s.startSPOA(top) // it must outlive the subtest that starts it
		procs = append(procs, s.spoa)
	}
	want := func(t *testing.T, caller string, code int, reason string) {
		t.Helper()
		harness.WaitFor(t, 10*time.Second, fmt.Sprintf("%s: %d %s", caller, code, reason), func() bool {
			got, body := s.mustGet(t, caller)
			return got == code && strings.Contains(body, reason)
		})
	}
	decisions := func(t *testing.T) {
		t.Helper()
		want(t, "web", 200, "source=web")
		want(t, "batch", 403, "intention_deny")
		want(t, "stranger", 403, "default_deny")
	}

	t.Run("token and TLS from flags: allow, deny, ACL default deny, an intention flip", func(t *testing.T) {
		decisions(t)
		c.SetIntentions(t, "api", harness.Source("web", deny), harness.Source("batch", deny))
		want(t, "web", 403, "intention_deny")
		c.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("batch", deny))
		want(t, "web", 200, "source=web")
	})

	t.Run("token and TLS from Consul's environment variables", func(t *testing.T) {
		restart(t, nil, c.Env(s.cutter.Addr, tok.SecretID))
		decisions(t)
	})

	t.Run("token from a file", func(t *testing.T) {
		file := harness.WriteFile(t, harness.TempDir(t), "token", tok.SecretID+"\n")
		restart(t, append(c.Flags(s.cutter.Addr, ""), "-token-file", file), nil)
		decisions(t)
	})

	t.Run("HTTP permissions: a request no permission matches gets the ACL default deny", func(t *testing.T) {
		c.SetProtocol(t, "api", "http")
		c.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/public"}},
		}}, harness.Source("batch", deny))
		k := s.dialKeepAlive(t, "web")
		harness.WaitFor(t, 5*time.Second, "web /public allowed by its permission", func() bool {
			code, _ := k.do(t, "GET", "/public/x")
			return code == 200
		})
		if code, body := k.do(t, "GET", "/private"); code != 403 || !strings.Contains(body, "(l7_default_deny)") {
			t.Fatalf("web /private: %d %q, want 403 l7_default_deny", code, body)
		}
		c.SetIntentions(t, "api", harness.Source("web", allow), harness.Source("batch", deny))
		want(t, "web", 200, "source=web")
	})

	t.Run("a token without service:write: the error names it, callers no intention decides are denied", func(t *testing.T) {
		weak := c.CreateToken(t, "spoa-read-only", `service "api" { policy = "read" }`)
		secrets = append(secrets, weak.SecretID)
		restart(t, c.Flags(s.cutter.Addr, weak.SecretID), nil)
		want(t, "web", 200, "source=web") // an intention decides: no authorize call
		want(t, "batch", 403, "intention_deny")
		want(t, "stranger", 403, "consul_error")
		line := `lacks permission 'service:write' on "api") (the token needs service:write on "api" to call /v1/agent/connect/authorize)`
		// The log reaches the test through a pipe: it may trail the answer.
		logged := func() bool {
			out := logText(s.spoa)
			return strings.Contains(out, line) && strings.Contains(out, weak.AccessorID)
		}
		for deadline := time.Now().Add(2 * time.Second); !logged() && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		if !logged() {
			t.Fatalf("no error naming service:write, the endpoint and the token's AccessorID:\n%s", logText(s.spoa))
		}
	})

	t.Run("an unknown token: every caller is denied, the log says Consul does not know it", func(t *testing.T) {
		bad := deletedToken(t, c)
		secrets = append(secrets, bad)
		restart(t, c.Flags(s.cutter.Addr, bad), nil)
		for _, caller := range []string{"web", "stranger"} {
			if code, body := s.mustGet(t, caller); code != 403 {
				t.Fatalf("%s with an unknown token: %d %q, want 403", caller, code, body)
			}
		}
		harness.WaitFor(t, 5*time.Second, "the log line", func() bool {
			return strings.Contains(s.spoa.Output(), "ACL not found")
		})
	})

	t.Run("no token in any log line of the SPOA or HAProxy", func(t *testing.T) {
		noSecrets(t, secrets, procs, s.dir)
	})
}

func TestSecureSidecars(t *testing.T) {
	m := &mesh{t: t, consul: harness.StartSecureConsul(t)}
	c := m.consul
	webPolicy, apiPolicy := sidecarPolicies(t)
	webTok, apiTok := c.CreateToken(t, "sidecar-web", webPolicy), c.CreateToken(t, "sidecar-api", apiPolicy)
	secrets := []string{c.Token, webTok.SecretID, apiTok.SecretID}
	c.SetIntentions(t, "api", harness.Source("web", allow))
	// TLS from flags (mesh.register); the token from a file for api, from
	// CONSUL_HTTP_TOKEN for web.
	apiFile := harness.WriteFile(t, harness.TempDir(t), "token", apiTok.SecretID)
	api1 := m.addInstance(&instance{id: "api-1", args: []string{"-token-file", apiFile, "-access-log"}}, "api")
	web := m.addInstance(&instance{id: "web-1", env: []string{"CONSUL_HTTP_TOKEN=" + webTok.SecretID},
		args: []string{"-access-log"}}, "web", "api")
	procs := []*harness.Process{api1.sidecar, web.sidecar}

	t.Run("web reaches api through both sidecars", func(t *testing.T) {
		harness.WaitFor(t, 20*time.Second, "web -> api 200", func() bool {
			code, body, err := web.call("api")
			return err == nil && code == 200 && body == "api-1 source=web"
		})
	})

	t.Run("deny refuses, no intention falls to the ACL default deny, allow restores", func(t *testing.T) {
		c.SetIntentions(t, "api", harness.Source("web", deny))
		harness.WaitFor(t, 5*time.Second, "web -> api denied", func() bool {
			code, body, _ := web.call("api")
			return code == 403 && strings.Contains(body, "intention_deny")
		})
		c.DeleteIntentions(t, "api")
		harness.WaitFor(t, 5*time.Second, "web -> api denied by default", func() bool {
			code, body, _ := web.call("api")
			return code == 403 && strings.Contains(body, "default_deny")
		})
		c.SetIntentions(t, "api", harness.Source("web", allow))
		harness.WaitFor(t, 5*time.Second, "web -> api allowed again", func() bool {
			code, _, _ := web.call("api")
			return code == 200
		})
	})

	// A sidecar for web whose token lacks one rule of the documented policy
	// logs Consul's refusal with what to grant. Without the registration
	// it renders nothing; without the upstream's instances it serves the
	// upstream with none, and says so once.
	weakSidecar := func(t *testing.T, dropped, want string, upstream bool) {
		t.Helper()
		rules := strings.Replace(webPolicy, dropped, "", 1)
		if rules == webPolicy {
			t.Fatalf("docs/acl/sidecar.hcl has no %q", dropped)
		}
		tok := c.CreateToken(t, "sidecar-web-weak-"+fmt.Sprint(len(secrets)), rules)
		secrets = append(secrets, tok.SecretID)
		dir := harness.TempDir(t)
		p := harness.Start(t, "weak sidecar", harness.Binary(t, "haconnect"), append([]string{"sidecar",
			"-proxy-id", "web-1-sidecar-proxy", "-dir", dir, "-log-level", "debug"}, c.Flags(c.Addr, tok.SecretID)...)...)
		procs = append(procs, p)
		harness.WaitFor(t, 10*time.Second, "the refusal logged", func() bool {
			return strings.Contains(logText(p), want)
		})
		time.Sleep(time.Second) // the watch retries meanwhile: still one line
		const emptyUpstream = "upstream instances cannot be read: serving it with no instances"
		count := func() (watchLines, emptyLines int) {
			for _, l := range strings.Split(logText(p), "\n") {
				if strings.Contains(l, emptyUpstream) {
					emptyLines++
				} else if strings.Contains(l, want) {
					watchLines++
				}
			}
			return watchLines, emptyLines
		}
		if watchLines, _ := count(); watchLines != 1 {
			t.Errorf("the refusal was logged %d times, want once:\n%s", watchLines, p.Output())
		}
		_, err := os.Stat(filepath.Join(dir, "haproxy.cfg"))
		switch {
		case !upstream && err == nil:
			t.Error("a configuration was rendered without the proxy's registration")
		case upstream:
			harness.WaitFor(t, 10*time.Second, "the configuration with the upstream served empty", func() bool {
				_, err := os.Stat(filepath.Join(dir, "haproxy.cfg"))
				return err == nil
			})
			if _, emptyLines := count(); emptyLines != 1 {
				t.Errorf("the upstream served empty was logged %d times, want once:\n%s", emptyLines, p.Output())
			}
		}
		p.Kill()
	}

	t.Run("a token without service:read on the proxy: the error names it and the endpoint", func(t *testing.T) {
		weakSidecar(t, "service \"web-sidecar-proxy\" {\n  policy = \"read\"\n}",
			`lacks permission 'service:read' on "web-sidecar-proxy") (calling /v1/agent/service/web-1-sidecar-proxy)`, false)
	})

	t.Run("a token without service:read on the upstream: the error names it and the endpoint", func(t *testing.T) {
		weakSidecar(t, "service \"api\" {\n  policy = \"read\"\n}",
			`(Permission denied) (the token needs service:read on "api" to call /v1/health/connect/api)`, true)
	})

	t.Run("a token that may not see the upstream's nodes: the hidden instances are reported", func(t *testing.T) {
		weakSidecar(t, "node_prefix \"\" {\n  policy = \"read\"\n}",
			`consul hides instances of "api" from the ACL token: it needs service:read on "api" and "api-sidecar-proxy" and node:read on their nodes`, true)
	})

	t.Run("no token in any log line of the sidecars and their HAProxy, nor in their files", func(t *testing.T) {
		if !strings.Contains(web.sidecar.Output(), "haproxy") {
			t.Fatal("HAProxy's own output is not in the sidecar's")
		}
		noSecrets(t, secrets, procs, web.dir, api1.dir)
	})

	t.Run("HAProxy does not inherit the token from the sidecar's environment", func(t *testing.T) {
		worker := workerPid(t, web.dir)
		for _, pid := range []int{worker, parentOf(t, worker)} {
			env := readFile(t, fmt.Sprintf("/proc/%d/environ", pid))
			if !strings.Contains(env, "PATH=") {
				t.Fatalf("haproxy %d: no environment read", pid)
			}
			if strings.Contains(env, webTok.SecretID) {
				t.Errorf("haproxy %d holds the token in its environment", pid)
			}
		}
	})
}

// TestSecureACLPoliciesAreMinimal removes each rule of the documented
// policies in turn and checks that a call the component makes then fails:
// Consul refuses it, or hides what it should return. The components make
// exactly these calls (authz.Authorizer and plugin/sidecar); the tests
// above run them with the full policies.
func TestSecureACLPoliciesAreMinimal(t *testing.T) {
	c := harness.StartSecureConsul(t)
	for _, reg := range []*api.AgentServiceRegistration{
		{ID: "api-1", Name: "api", Port: 20000, Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: 20001}}},
		{ID: "web-1", Name: "web", Port: 20010, Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{Port: 20011,
			Proxy: &api.AgentServiceConnectProxyConfig{Upstreams: []api.Upstream{{DestinationName: "api", LocalBindPort: 20012}}}}}},
	} {
		reg.Address = "127.0.0.1"
		reg.Connect.SidecarService.Checks = api.AgentServiceChecks{{Name: "up", TTL: "1h", Status: api.HealthPassing}}
		if err := c.Client.Agent().ServiceRegister(reg); err != nil {
			t.Fatal(err)
		}
	}
	_, td := c.RootsPEM(t)
	caller := "spiffe://" + td + "/ns/default/dc/dc1/svc/caller"

	// The calls, by what they serve. The leaf certificate is not among them:
	// the agent hands out a leaf it has cached (it fetches the leaves of
	// the sidecars registered on it) to any token, so removing service:write
	// does not break that call; the authorize call needs it anyway.
	type call func(cl *api.Client) error
	authorize := func(target string) call {
		return func(cl *api.Client) error {
			_, err := cl.Agent().ConnectAuthorize(&api.AgentAuthorizeParams{Target: target, ClientCertURI: caller})
			return err
		}
	}
	intentions := func(target string) call {
		return func(cl *api.Client) error {
			_, _, err := cl.Connect().IntentionMatch(&api.IntentionMatch{By: api.IntentionMatchDestination, Names: []string{target}}, nil)
			return err
		}
	}
	chain := func(target string) call {
		return func(cl *api.Client) error { _, _, err := cl.DiscoveryChain().Get(target, nil, nil); return err }
	}
	calls := map[string]call{
		"authorize api": authorize("api"), "intentions of api": intentions("api"), "discovery chain of api": chain("api"),
		"authorize web": authorize("web"), "intentions of web": intentions("web"), "discovery chain of web": chain("web"),
		"CA roots": func(cl *api.Client) error { _, _, err := cl.Agent().ConnectCARoots(nil); return err },
		"proxy registration": func(cl *api.Client) error {
			_, _, err := cl.Agent().Service("web-1-sidecar-proxy", nil)
			return err
		},
		"the proxy among the agent's services (-sidecar-for)": func(cl *api.Client) error {
			svcs, err := cl.Agent().ServicesWithFilter(`Kind == "connect-proxy" and Proxy.DestinationServiceID == "web-1"`)
			if err == nil && len(svcs) != 1 {
				err = fmt.Errorf("%d proxies listed, want 1", len(svcs))
			}
			return err
		},
		"instances of api": func(cl *api.Client) error {
			entries, meta, err := cl.Health().Connect("api", "", true, nil)
			if err == nil && (len(entries) != 1 || meta.ResultsFilteredByACLs) {
				err = fmt.Errorf("%d instances, filtered by ACLs: %v; want 1", len(entries), meta.ResultsFilteredByACLs)
			}
			return err
		},
	}
	for _, tc := range []struct {
		policy string
		rules  string
		calls  []string
		// needed names, for each rule, a call that fails without it.
		needed map[string]string
	}{
		{"spoa.hcl", readPolicy(t, "spoa.hcl"),
			[]string{"authorize api", "intentions of api", "discovery chain of api", "CA roots"},
			map[string]string{`service "api"`: "authorize api"}},
		{"sidecar.hcl", readPolicy(t, "sidecar.hcl"),
			[]string{"authorize web", "intentions of web", "discovery chain of web", "CA roots", "proxy registration",
				"the proxy among the agent's services (-sidecar-for)", "instances of api"},
			map[string]string{`service "web"`: "authorize web", `service "web-sidecar-proxy"`: "proxy registration",
				`service "api"`: "instances of api", `service "api-sidecar-proxy"`: "instances of api", `node_prefix ""`: "instances of api"}},
	} {
		t.Run(tc.policy, func(t *testing.T) {
			n := 0
			client := func(rules string) *api.Client {
				n++
				cfg := c.Config()
				cfg.Token = c.CreateToken(t, fmt.Sprintf("%s-%d", strings.TrimSuffix(tc.policy, ".hcl"), n), rules).SecretID
				cl, err := api.NewClient(cfg)
				if err != nil {
					t.Fatal(err)
				}
				return cl
			}
			full := client(tc.rules)
			for _, name := range tc.calls {
				if err := calls[name](full); err != nil {
					t.Errorf("with the whole policy, %s: %v", name, err)
				}
			}
			file, diags := hclsyntax.ParseConfig([]byte(tc.rules), tc.policy, hcl.InitialPos)
			if diags.HasErrors() {
				t.Fatal(diags)
			}
			blocks := file.Body.(*hclsyntax.Body).Blocks
			if len(blocks) != len(tc.needed) {
				t.Fatalf("%d rules, %d of them checked here", len(blocks), len(tc.needed))
			}
			for _, b := range blocks {
				rule := b.Type + ` "` + strings.Join(b.Labels, `" "`) + `"`
				name, ok := tc.needed[rule]
				if !ok {
					t.Fatalf("rule %s is not checked here", rule)
				}
				r := b.Range()
				without := tc.rules[:r.Start.Byte] + tc.rules[r.End.Byte:]
				err := calls[name](client(without))
				if err == nil {
					t.Errorf("without %s, %s still works: the rule is not needed", rule, name)
					continue
				}
				t.Logf("without %s, %s fails: %v", rule, name, err)
			}
		})
	}
}

// TestSecureNomadHook runs `haconnect nomad-hook` (HAProxy as a child
// process) with the sidecar policy, Consul's address and TLS settings in
// the task's environment, as a Nomad job sets them, and the token given
// either way Nomad gives one: CONSUL_HTTP_TOKEN (a task with its own Consul
// identity, taskrunner/consul_hook.go), or only the file
// ${NOMAD_SECRETS_DIR}/si_token, mode 0440, that Nomad writes for a
// Connect sidecar task from its service's workload identity
// (taskrunner/sids_hook.go) and Envoy's bootstrap reads.
func TestSecureNomadHook(t *testing.T) {
	c := harness.StartSecureConsul(t)
	c.SetIntentions(t, "api", harness.Source("web", allow))
	_, policy := sidecarPolicies(t)
	tok := c.CreateToken(t, "nomad-hook-api", policy)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "app source=%s", r.Header.Get("X-Haconnect-Source"))
	}))
	t.Cleanup(app.Close)
	roots, _ := c.RootsPEM(t)
	for i, delivery := range []string{"CONSUL_HTTP_TOKEN", "si_token"} {
		t.Run(delivery, func(t *testing.T) {
			fn := newFakeNomad(t)
			id := fmt.Sprintf("5ec0e000-0000-4000-8000-00000000000%d", i+1)
			fn.set(id, connectAlloc(id))
			port := harness.FreePort(t)
			registerNomadServices(t, c, id, port, "127.0.0.1", port, app.Listener.Addr().(*net.TCPAddr).Port)
			dir := harness.TempDir(t)
			env := slices.Concat(hookEnv(id, fn.URL), c.Env(c.Addr, tok.SecretID))
			if delivery == "si_token" {
				secrets := harness.TempDir(t)
				if err := os.WriteFile(filepath.Join(secrets, "si_token"), []byte(tok.SecretID), 0o440); err != nil {
					t.Fatal(err)
				}
				env = slices.Concat(hookEnv(id, fn.URL), c.Env(c.Addr, ""), []string{"NOMAD_SECRETS_DIR=" + secrets})
			}
			hook := harness.StartEnv(t, "nomad-hook", env,
				harness.Binary(t, "haconnect"), "nomad-hook", "-launcher", "exec", "-dir", dir, "-stop-grace", "1s", "-log-level", "debug")
			harness.WaitListening(t, fmt.Sprintf("127.0.0.1:%d", port), 20*time.Second)
			if !strings.Contains(hook.Output(), `Consul ACL token: from=`+map[string]string{
				"CONSUL_HTTP_TOKEN": "CONSUL_HTTP_TOKEN", "si_token": `"$NOMAD_SECRETS_DIR/si_token"`}[delivery]) {
				t.Errorf("the hook does not say where its token came from:\n%s", hook.Output())
			}
			call := func(caller string) (int, string) { return callPort(t, c, roots, caller, port) }
			if code, body := call("web"); code != 200 || body != "app source=web" {
				t.Fatalf("web: %d %q, want 200 \"app source=web\"", code, body)
			}
			if code, body := call("stranger"); code != 403 || !strings.Contains(body, "default_deny") {
				t.Fatalf("stranger: %d %q, want 403 default_deny", code, body)
			}
			noSecrets(t, []string{c.Token, tok.SecretID}, []*harness.Process{hook}, dir)
		})
	}
}
