package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/haconnect/haconnect/internal/testkit/harness"
)

// grpcApp serves gRPC's standard health service in h2c on a loopback
// port: Check is a unary call, Watch a server stream that sends the
// service's status on every change.
func grpcApp(t testing.TB) (int, *health.Server) {
	port, hs, _ := grpcAppSeeing(t)
	return port, hs
}

// grpcAppSeeing is grpcApp that also keeps the x-haconnect-source
// metadata of the last unary call it served.
func grpcAppSeeing(t testing.TB) (int, *health.Server, *atomic.Value) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var source atomic.Value
	s := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		source.Store(strings.Join(md.Get("x-haconnect-source"), ","))
		return h(ctx, req)
	}))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return l.Addr().(*net.TCPAddr).Port, hs, &source
}

// grpcClient is one gRPC client connection (one HTTP/2 connection, in
// h2c) to a local upstream port.
func grpcClient(t testing.TB, port int) healthpb.HealthClient {
	t.Helper()
	cc, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", port), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return healthpb.NewHealthClient(cc)
}

func check(c healthpb.HealthClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
	if err == nil && resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		err = fmt.Errorf("status %v", resp.GetStatus())
	}
	return err
}

// TestGRPC runs grpc-go's client and server through two sidecars: web
// (an http service with a grpc upstream) calls api (a grpc service).
// Between the sidecars it is h2 over mTLS; each app speaks h2c.
func TestGRPC(t *testing.T) {
	m := newMesh(t)
	m.consul.SetProtocol(t, "api", "grpc")
	m.consul.SetIntentions(t, "api", harness.Source("web", allow))
	appPort, hs, source := grpcAppSeeing(t)
	admin := fmt.Sprintf("127.0.0.1:%d", harness.FreePort(t))
	apiIn := m.register(&instance{id: "api-1", args: []string{"-admin-bind", admin}}, "api", "grpc", appPort)
	web := m.add("web", "web-1", "api:grpc")
	client := grpcClient(t, web.upstream["api"])
	harness.WaitFor(t, 10*time.Second, "a first gRPC call", func() bool { return check(client) == nil })

	t.Run("unary calls, tagged and counted per call", func(t *testing.T) {
		pair := map[string]string{"source": "web", "destination": "api", "code_class": "2xx"}
		before := find(scrape(t, admin)["haconnect_requests_total"], pair).GetCounter().GetValue()
		for i := 0; i < 20; i++ {
			if err := check(client); err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
		}
		if got := source.Load(); got != "web" {
			t.Errorf("the app saw x-haconnect-source %q, want web", got)
		}
		after := find(scrape(t, admin)["haconnect_requests_total"], pair).GetCounter().GetValue()
		if after-before != 20 {
			t.Errorf("haconnect_requests_total{web,api,2xx} grew by %v over 20 calls", after-before)
		}
	})

	t.Run("200 concurrent calls on one client connection", func(t *testing.T) {
		var wg sync.WaitGroup
		var failed atomic.Int64
		var firstErr atomic.Value
		for i := 0; i < 200; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := check(client); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}()
		}
		wg.Wait()
		if n := failed.Load(); n > 0 {
			t.Fatalf("%d of 200 concurrent calls failed, first: %v", n, firstErr.Load())
		}
		// Between the sidecars the calls went as h2 streams (ALPN h2), on
		// few connections: api's listener counts h2 HEADERS frames.
		stat := apiIn.admin(t, "show stat public_listener 1 -1 typed")
		streams, conns := typedStat(stat, "h2_headers_rcvd"), typedStat(stat, "h2_total_connections")
		if streams < 200 || conns < 1 || conns > 4 {
			t.Errorf("api's listener saw %d h2 streams on %d h2 connections, want >= 200 on 1-4", streams, conns)
		}
		t.Logf("api's listener: %d h2 streams on %d h2 connections", streams, conns)
	})

	t.Run("a server stream", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: "watched"})
		if err != nil {
			t.Fatal(err)
		}
		hs.SetServingStatus("watched", healthpb.HealthCheckResponse_SERVING)
		for _, want := range []healthpb.HealthCheckResponse_ServingStatus{healthpb.HealthCheckResponse_SERVING, healthpb.HealthCheckResponse_NOT_SERVING} {
			// The first message may be SERVICE_UNKNOWN, sent before the
			// status was set.
			for {
				msg, err := stream.Recv()
				if err != nil {
					t.Fatalf("waiting for %v: %v", want, err)
				}
				if msg.GetStatus() == want {
					break
				}
			}
			hs.SetServingStatus("watched", healthpb.HealthCheckResponse_NOT_SERVING)
		}
	})

	t.Run("an L7 intention denies one method and allows the rest", func(t *testing.T) {
		m.consul.SetIntentions(t, "api", &api.SourceIntention{Name: "web", Permissions: []*api.IntentionPermission{
			{Action: deny, HTTP: &api.IntentionHTTPPermission{PathExact: "/grpc.health.v1.Health/Watch"}},
			{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/"}},
		}})
		defer m.consul.SetIntentions(t, "api", harness.Source("web", allow))
		watchDenied := func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{})
			if err == nil {
				_, err = stream.Recv()
			}
			return err
		}
		harness.WaitFor(t, 5*time.Second, "Watch denied", func() bool {
			return status.Code(watchDenied()) == codes.PermissionDenied
		})
		err := watchDenied()
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "403") {
			t.Fatalf("Watch: %v, want PermissionDenied from a 403", err)
		}
		t.Logf("a denied method, as grpc-go reports it: %v", err)
		for i := 0; i < 10; i++ {
			if err := check(client); err != nil {
				t.Fatalf("Check, allowed by the second permission: %v", err)
			}
		}
	})

	t.Run("a caller-wide deny is PermissionDenied within 1s on the same connection", func(t *testing.T) {
		defer m.consul.SetIntentions(t, "api", harness.Source("web", allow))
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { return check(client) == nil })
		denied := time.Now()
		m.consul.SetIntentions(t, "api", harness.Source("web", deny))
		var err error
		for time.Since(denied) < 3*time.Second {
			if err = check(client); err != nil {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(denied)
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("after the deny: %v, want PermissionDenied", err)
		}
		if took > time.Second {
			t.Errorf("the deny took %s to reach a connected client, want <= 1s", took)
		}
		t.Logf("deny seen by the connected client %s after the intention write", took.Round(time.Millisecond))
	})

	t.Run("an open stream is closed within 1s of a deny", func(t *testing.T) {
		defer m.consul.SetIntentions(t, "api", harness.Source("web", allow))
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { return check(client) == nil })
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: "long"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil { // the stream is open end to end
			t.Fatal(err)
		}
		ended := make(chan error, 1)
		go func() {
			for {
				if _, err := stream.Recv(); err != nil {
					ended <- err
					return
				}
			}
		}()
		denied := time.Now()
		m.consul.SetIntentions(t, "api", harness.Source("web", deny))
		select {
		case err := <-ended:
			took := time.Since(denied)
			if took > time.Second {
				t.Errorf("the stream was closed %s after the deny, want <= 1s", took)
			}
			t.Logf("stream closed %s after the deny: %v", took.Round(time.Millisecond), err)
		case <-time.After(5 * time.Second):
			t.Fatal("the open stream outlived the deny by 5s")
		}
		if out := apiIn.sidecar.Output(); !strings.Contains(out, "closing the open connections of a caller") {
			t.Error("the revocation is not logged")
		}
	})

	t.Run("a CA rotation under gRPC load fails no call", func(t *testing.T) {
		harness.WaitFor(t, 5*time.Second, "allowed", func() bool { return check(client) == nil })
		webLeaf, apiLeaf := readFile(t, web.dir+"/leaf.pem"), readFile(t, apiIn.dir+"/leaf.pem")
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var ok, failed atomic.Int64
		var firstErr atomic.Value
		for w := 0; w < 4; w++ {
			wg.Add(1)
			c := grpcClient(t, web.upstream["api"]) // also new connections
			go func() {
				defer wg.Done()
				for i := 0; i < 100000; i++ {
					select {
					case <-stop:
						return
					default:
					}
					if err := check(c); err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					} else {
						ok.Add(1)
					}
					time.Sleep(2 * time.Millisecond)
				}
			}()
		}
		time.Sleep(300 * time.Millisecond)
		m.rotateCA(t)
		harness.WaitFor(t, 30*time.Second, "both sidecars on new leaves", func() bool {
			return readFile(t, web.dir+"/leaf.pem") != webLeaf && readFile(t, apiIn.dir+"/leaf.pem") != apiLeaf
		})
		time.Sleep(time.Second)
		close(stop)
		wg.Wait()
		if n := failed.Load(); n > 0 {
			t.Fatalf("%d of %d calls failed across the rotation, first: %v", n, n+ok.Load(), firstErr.Load())
		}
		if ok.Load() == 0 {
			t.Fatal("no call made")
		}
		t.Logf("%d calls across the CA rotation, none failed", ok.Load())
		// After it: a new client connection, new leaves.
		if err := check(grpcClient(t, web.upstream["api"])); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a dead upstream is Unavailable", func(t *testing.T) {
		apiIn.sidecar.Kill()
		var err error
		harness.WaitFor(t, 10*time.Second, "a failing call", func() bool { err = check(client); return err != nil })
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("with api's sidecar gone: %v, want Unavailable", err)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("the call waited for its deadline")
		}
	})
}

// typedStat reads a counter from `show stat ... typed` output, lines such
// as "F.2.0.106.h2_headers_rcvd.1:MCP:u64:201".
func typedStat(out, name string) int {
	for _, line := range strings.Split(out, "\n") {
		field, value, ok := strings.Cut(line, ":")
		if !ok || !strings.Contains(field, "."+name+".") {
			continue
		}
		var n int
		fmt.Sscanf(value[strings.LastIndex(value, ":")+1:], "%d", &n)
		return n
	}
	return -1
}

// TestMixedProtocols: one sidecar, of a TCP service, with a grpc, an http
// and a tcp upstream at once, each served at its own layer.
func TestMixedProtocols(t *testing.T) {
	m := newMesh(t)
	for _, dest := range []string{"api", "hello", "echo"} {
		m.consul.SetIntentions(t, dest, harness.Source("front", allow))
	}
	grpcPort, _ := grpcApp(t)
	m.register(&instance{id: "api-1"}, "api", "grpc", grpcPort)
	m.add("hello", "hello-1")
	m.register(&instance{id: "echo-1"}, "echo", "tcp", startEcho(t))
	front := m.register(&instance{id: "front-1"}, "front", "tcp", startEcho(t), "api:grpc", "hello:http", "echo:tcp")

	client := grpcClient(t, front.upstream["api"])
	harness.WaitFor(t, 10*time.Second, "the grpc upstream", func() bool { return check(client) == nil })
	harness.WaitFor(t, 10*time.Second, "the http upstream", func() bool {
		code, body, _ := front.call("hello")
		return code == 200 && body == "hello-1 source=front"
	})
	harness.WaitFor(t, 10*time.Second, "the tcp upstream", func() bool {
		got, err := front.echo("echo", "ping")
		return err == nil && got == "ping"
	})
	cfg := readFile(t, front.dir+"/haproxy.cfg")
	for _, want := range []string{"backend upstream_api\n    mode http", "backend upstream_hello\n    mode http", "backend upstream_echo\n    mode tcp"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("the rendered configuration lacks %q", want)
		}
	}
}

// TestGRPCCheckThroughExposedPath: a gRPC service whose Consul gRPC health
// check the agent reroutes through the proxy (Proxy.Expose.Checks, as
// Envoy's exposed check listener): haconnect serves it in h2c on the
// check's port, and the check goes passing, then critical when the app
// reports NOT_SERVING.
func TestGRPCCheckThroughExposedPath(t *testing.T) {
	m := newMesh(t)
	appPort, hs := grpcApp(t)
	proxyPort := harness.FreePort(t)
	reg := &api.AgentServiceRegistration{
		ID: "api-1", Name: "api", Address: "127.0.0.1", Port: appPort,
		Checks: api.AgentServiceChecks{{CheckID: "api-grpc", GRPC: fmt.Sprintf("127.0.0.1:%d", appPort),
			Interval: "1s", Timeout: "1s"}},
		Connect: &api.AgentServiceConnect{SidecarService: &api.AgentServiceRegistration{
			Port: proxyPort, Address: "127.0.0.1",
			Proxy: &api.AgentServiceConnectProxyConfig{
				Config: map[string]any{"protocol": "grpc", "bind_address": "127.0.0.1"},
				Expose: api.ExposeConfig{Checks: true},
			},
			Checks: listeningCheck(proxyPort),
		}},
	}
	if err := m.consul.Client.Agent().ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	checks, err := m.consul.Client.Agent().ChecksWithFilter(`CheckID == "api-grpc"`)
	if err != nil || checks["api-grpc"] == nil || checks["api-grpc"].ExposedPort == 0 {
		t.Fatalf("the agent gave the gRPC check no exposed port: %v %+v", err, checks)
	}
	exposed := checks["api-grpc"].ExposedPort
	harness.Start(t, "sidecar api-1", harness.Binary(t, "haconnect"), append([]string{"sidecar",
		"-sidecar-for", "api-1", "-dir", harness.TempDir(t), "-stop-grace", "2s"}, m.consul.Flags(m.consul.Addr, "")...)...)
	status := func() string {
		ch, err := m.consul.Client.Agent().ChecksWithFilter(`CheckID == "api-grpc"`)
		if err != nil || ch["api-grpc"] == nil {
			return ""
		}
		return ch["api-grpc"].Status + " " + ch["api-grpc"].Output
	}
	harness.WaitFor(t, 20*time.Second, "the gRPC check passing through the proxy", func() bool {
		return strings.HasPrefix(status(), api.HealthPassing) && strings.Contains(status(), fmt.Sprintf(":%d", exposed))
	})
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	harness.WaitFor(t, 20*time.Second, "the check critical once the app is NOT_SERVING", func() bool {
		return strings.HasPrefix(status(), api.HealthCritical)
	})
	t.Logf("check output: %s", status())
}
