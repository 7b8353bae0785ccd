package sidecar

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/backoff"
	"github.com/haconnect/haconnect/internal/consulflags"
)

// blockingResult is where a blocking query left off: an index, or a content
// hash for the agent's local endpoints.
type blockingResult struct {
	index uint64
	hash  string
}

// watch runs a blocking query until ctx is done, retrying with backoff and
// logging once when it starts failing and once when it recovers. endpoint
// is what a refused token must be granted access to.
func (s *Sidecar) watch(ctx context.Context, what, endpoint string,
	fetch func(ctx context.Context, q *api.QueryOptions) (blockingResult, error)) {
	var last blockingResult
	retry := newBackoff()
	failing := false
	for ctx.Err() == nil {
		q := &api.QueryOptions{WaitIndex: last.index, WaitHash: last.hash, WaitTime: 5 * time.Minute}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Minute+30*time.Second)
		res, err := fetch(qctx, q)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.metrics.consulErrors.Inc()
			if !failing {
				if _, refused := consulflags.Refused(err); refused {
					s.log.Error("consul refused the ACL token: keeping the running configuration and retrying",
						"watch", what, "error", explainRefusal(endpoint, err))
				} else {
					s.log.Warn("consul query failing: keeping the running configuration and retrying",
						"watch", what, "error", err)
				}
				failing = true
			}
			last = blockingResult{}
			if !retry.Wait(ctx) {
				return
			}
			continue
		}
		if failing {
			s.log.Info("consul query recovered", "watch", what)
			failing = false
		}
		retry.Reset()
		if res.index < last.index {
			res.index = 0
		}
		last = res
	}
}

// healthEndpoint is the prefix of the upstream instances' endpoint.
const healthEndpoint = "/v1/health/connect/"

// explainRefusal adds what to fix to a watch's 403 error. Consul names the
// missing permission itself, except /v1/health/connect, which answers a
// bare "Permission denied" without service:read on the upstream.
func explainRefusal(endpoint string, err error) error {
	if name, ok := strings.CutPrefix(endpoint, healthEndpoint); ok && !strings.Contains(err.Error(), "lacks permission") {
		return consulflags.Explain(err, fmt.Sprintf("the token needs service:read on %q to call %s", name, endpoint))
	}
	return consulflags.Explain(err, "calling "+endpoint)
}

// newBackoff spaces the retries of a failing Consul call: from 100ms,
// doubling up to 5s.
func newBackoff() *backoff.Backoff { return backoff.New(100*time.Millisecond, 5*time.Second) }
