package consulwatch

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

func TestPathInOutput(t *testing.T) {
	for _, tc := range []struct {
		output string
		port   int
		want   string
	}{
		{"HTTP GET http://10.1.2.3:21500/health: 200 OK Output: ok", 21500, "/health"},
		{"HTTP GET http://10.1.2.3:21502/healthz?x=1: 404 Not Found Output: ", 21502, "/healthz"},
		{`Get "http://127.0.0.1:21500/ready": dial tcp 127.0.0.1:21500: connect: connection refused`, 21500, "/ready"},
		{`Get "http://127.0.0.1:21500/odd:": EOF`, 21500, "/odd:"},
		{"HTTP GET http://[::1]:21500/h%20x: 200 OK Output: see http://example.com:21500/other", 21500, "/h%20x"},
		{"HTTP GET http://10.1.2.3:21500: 200 OK Output: ", 21500, "/"},
		{"HTTP GET http://10.1.2.3:8080/health: 200 OK Output: ", 21500, ""}, // another port: not the exposed URL
		{"", 21500, ""},
	} {
		if got := pathInOutput(tc.output, tc.port); got != tc.want {
			t.Errorf("%q: %q, want %q", tc.output, got, tc.want)
		}
	}
}

// TestExposedChecksQuery registers, on a real agent, a service with an
// HTTP and a gRPC check and its proxy with Expose.Checks: the query gives
// each check the port the agent allocated, the gRPC path at once, and the
// HTTP path once the agent has run the check (through the port, where
// nothing listens yet).
func TestExposedChecksQuery(t *testing.T) {
	c := harness.StartConsul(t)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(app.Close)
	agent := c.Client.Agent()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(agent.ServiceRegister(&api.AgentServiceRegistration{ID: "api-1", Name: "api", Port: 8080, Address: "127.0.0.1",
		Checks: api.AgentServiceChecks{
			{CheckID: "http", HTTP: app.URL + "/ready", Interval: "1s", Timeout: "500ms"},
			{CheckID: "grpc", GRPC: "127.0.0.1:9090/api", Interval: "10s"},
			{CheckID: "tcp", TCP: "127.0.0.1:8080", Interval: "10s"},
		}}))
	must(agent.ServiceRegister(&api.AgentServiceRegistration{Kind: api.ServiceKindConnectProxy, ID: "api-1-sidecar-proxy",
		Name: "api-sidecar-proxy", Port: harness.FreePort(t), Address: "127.0.0.1",
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: "api-1",
			LocalServicePort: 8080, Expose: api.ExposeConfig{Checks: true}}}))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var mu sync.Mutex
	var answers []*ExposedChecks
	query := &ExposedChecksQuery{ServiceID: "api-1", Poll: 200 * time.Millisecond}
	go Run(ctx, c.Client, query, Watch{}, func(v *ExposedChecks) {
		mu.Lock()
		answers = append(answers, v)
		mu.Unlock()
	})
	last := func() *ExposedChecks {
		mu.Lock()
		defer mu.Unlock()
		if len(answers) == 0 {
			return nil
		}
		return answers[len(answers)-1]
	}
	harness.WaitFor(t, 15*time.Second, "the HTTP check's path", func() bool {
		v := last()
		return v != nil && len(v.Checks) == 2 && v.Checks[1].Path == "/ready"
	})
	v := last()
	if v.AgentAddr != "127.0.0.1" {
		t.Errorf("agent address %q", v.AgentAddr)
	}
	grpc, http := v.Checks[0], v.Checks[1]
	if grpc.CheckID != "grpc" || grpc.Type != "grpc" || grpc.Path != GRPCHealthPath || http.CheckID != "http" || http.Type != "http" {
		t.Fatalf("checks %+v", v.Checks)
	}
	for _, ch := range v.Checks {
		if ch.ExposedPort < 21500 || ch.ExposedPort > 21755 {
			t.Errorf("check %s: exposed port %d outside Consul's default range", ch.CheckID, ch.ExposedPort)
		}
	}
	// What the agent calls is the proxy's address on that port.
	checks, err := agent.ChecksWithFilter(`CheckID == "http"`)
	must(err)
	if want := fmt.Sprintf("http://127.0.0.1:%d/ready", http.ExposedPort); !strings.Contains(checks["http"].Output, want) {
		t.Errorf("the agent's output %q does not name %s", checks["http"].Output, want)
	}
	// Without Expose.Checks the agent calls the app again, and nothing is
	// exposed.
	must(agent.ServiceRegister(&api.AgentServiceRegistration{Kind: api.ServiceKindConnectProxy, ID: "api-1-sidecar-proxy",
		Name: "api-sidecar-proxy", Port: harness.FreePort(t), Address: "127.0.0.1",
		Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "api", DestinationServiceID: "api-1", LocalServicePort: 8080}}))
	harness.WaitFor(t, 5*time.Second, "no exposed checks", func() bool {
		v := last()
		return v != nil && len(v.Checks) == 0
	})
}
