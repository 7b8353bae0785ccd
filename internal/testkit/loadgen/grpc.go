package loadgen

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// GRPCConfig describes a run of unary gRPC calls: the standard health
// service's Check, in h2c, the way an app calls a local upstream.
type GRPCConfig struct {
	Addr string
	// Conns client connections (one HTTP/2 connection each, default 4),
	// each carrying Streams calls at a time (default 32).
	Conns, Streams int
	Duration       time.Duration // default 5s
}

// RunGRPC makes Check calls until cfg.Duration has passed or ctx is done.
// A call counts as a request; one that fails or does not answer SERVING
// counts as an error.
func RunGRPC(ctx context.Context, cfg GRPCConfig) Result {
	if cfg.Conns <= 0 {
		cfg.Conns = 4
	}
	if cfg.Streams <= 0 {
		cfg.Streams = 32
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 5 * time.Second
	}
	var res Result
	var clients []healthpb.HealthClient
	for i := 0; i < cfg.Conns; i++ {
		cc, err := grpc.NewClient(cfg.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			res.Errors, res.FirstError = 1, err.Error()
			return res
		}
		defer cc.Close()
		clients = append(clients, healthpb.NewHealthClient(cc))
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	end, _ := ctx.Deadline()
	workers := make([]worker, cfg.Conns*cfg.Streams)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range workers {
		wg.Add(1)
		go func(w *worker, c healthpb.HealthClient) {
			defer wg.Done()
			// Each call has its own deadline past the run's end: a call
			// in flight when the run ends is finished, not cancelled.
			for ctx.Err() == nil && time.Now().Before(end) {
				t0 := time.Now()
				callCtx, callCancel := context.WithDeadline(context.Background(), end.Add(2*time.Second))
				resp, err := c.Check(callCtx, &healthpb.HealthCheckRequest{})
				callCancel()
				switch {
				case err != nil:
					w.fail(err)
				case resp.GetStatus() != healthpb.HealthCheckResponse_SERVING:
					w.fail(fmt.Errorf("status %v", resp.GetStatus()))
				default:
					w.lat = append(w.lat, time.Since(t0))
				}
			}
		}(&workers[i], clients[i%cfg.Conns])
	}
	wg.Wait()
	return collect(workers, time.Since(start))
}
