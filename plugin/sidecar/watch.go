package sidecar

import (
	"time"

	"github.com/haconnect/haconnect/internal/backoff"
	"github.com/haconnect/haconnect/internal/consulflags"
	"github.com/haconnect/haconnect/internal/consulwatch"
)

// named is what the sidecar needs of a query to log about it.
type named interface {
	Name() string
	Endpoint() string
}

// hooks are what the sidecar does around each of its watches: count
// errors, and log once when a watch starts failing and once when it
// recovers, keeping the running configuration meanwhile.
func (s *Sidecar) hooks(q named) consulwatch.Watch {
	what, endpoint := q.Name(), q.Endpoint()
	return consulwatch.Watch{
		WaitTime: 5 * time.Minute,
		Backoff:  newBackoff(),
		OnError:  func(error) { s.metrics.consulErrors.Inc() },
		OnFailing: func(err error) {
			if _, refused := consulflags.Refused(err); refused {
				s.log.Error("consul refused the ACL token: keeping the running configuration and retrying",
					"watch", what, "error", consulwatch.ExplainRefusal(endpoint, err))
			} else {
				s.log.Warn("consul query failing: keeping the running configuration and retrying",
					"watch", what, "error", err)
			}
		},
		OnRecovered: func() { s.log.Info("consul query recovered", "watch", what) },
	}
}

// newBackoff spaces the retries of a failing Consul call: from 100ms,
// doubling up to 5s.
func newBackoff() *backoff.Backoff { return backoff.New(100*time.Millisecond, 5*time.Second) }
