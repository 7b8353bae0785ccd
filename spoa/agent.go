package spoa

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/haconnect/haconnect/plugin/revoke"
	"github.com/haconnect/haconnect/spoa/authz"
)

// AgentConfig is one authorization agent, assembled in one place for both
// haconnect-spoa and the sidecar: the authorizer, the optional revocation
// of open streams it reports changes to, and the optional SPOP server that
// answers HAProxy from it.
type AgentConfig struct {
	// Authz configures the authorizer; its OnChange is set by NewAgent
	// when Revoke is set.
	Authz authz.Config
	// Destinations are watched from the start and for good.
	Destinations []string
	// Revoke, if set, closes the open streams of callers a change denies.
	Revoke *revoke.Config
	// Server, if set, answers SPOP from the authorizer (its Decider is set
	// by NewAgent). Nil: the decisions are served by another agent, and
	// this one only revokes (the sidecar with an external SPOA).
	Server *Config
	// OnChange, if set, is told of every change the authorizer reports,
	// after the revoker (it must not block).
	OnChange func(destination string)
}

// Agent is an assembled authorization agent. Start it, then Serve.
type Agent struct {
	Authorizer *authz.Authorizer
	Revoker    *revoke.Revoker // nil without AgentConfig.Revoke
	Server     *Server         // nil without AgentConfig.Server

	destinations []string
	running      sync.WaitGroup
}

// NewAgent checks cfg and assembles the agent. The revoker exists before
// the authorizer, whose changes it receives, and is handed the authorizer
// to re-check with when it starts.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	a := &Agent{destinations: cfg.Destinations}
	var err error
	if cfg.Revoke != nil {
		if a.Revoker, err = revoke.New(*cfg.Revoke); err != nil {
			return nil, err
		}
		cfg.Authz.OnChange = a.Revoker.Changed
	}
	if also, first := cfg.OnChange, cfg.Authz.OnChange; also != nil {
		cfg.Authz.OnChange = func(destination string) {
			if first != nil {
				first(destination)
			}
			also(destination)
		}
	}
	if a.Authorizer, err = authz.New(cfg.Authz); err != nil {
		return nil, err
	}
	if cfg.Server != nil {
		sc := *cfg.Server
		sc.Decider = a.Authorizer
		if a.Server, err = NewServer(sc); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Start begins the authorizer's watches and the revoker, until ctx is done.
func (a *Agent) Start(ctx context.Context) {
	a.Authorizer.Start(ctx, a.destinations...)
	if a.Revoker != nil {
		a.running.Go(func() { a.Revoker.Run(ctx, a.Authorizer) })
	}
}

// Serve answers SPOP on l until ctx is done.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	if a.Server == nil {
		return errors.New("spoa: this agent has no server")
	}
	return a.Server.Serve(ctx, l)
}

// Wait returns once the revoker has stopped (after ctx of Start is done).
func (a *Agent) Wait() { a.running.Wait() }

// MaxTTL is the longest ttl_ms an agent sends: a decision reused longer
// would keep a revoked caller in for that long.
const MaxTTL = time.Hour

// CheckTTL says what is wrong with a ttl flag, for both commands.
func CheckTTL(ttl time.Duration) error {
	if ttl <= 0 || ttl > MaxTTL {
		return fmt.Errorf("-ttl must be in (0, %s], got %s", MaxTTL, ttl)
	}
	return nil
}
