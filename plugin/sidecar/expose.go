package sidecar

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/plugin/render"
)

// exposeConfig is what a registration asks of Proxy.Expose.
type exposeConfig struct {
	// Paths are the registered Proxy.Expose.Paths that can be served (the
	// others are refused by name).
	Paths []render.ExposedPath
	// Checks (Proxy.Expose.Checks) exposes every HTTP and gRPC check of
	// ServiceID (Proxy.DestinationServiceID) that the agent reroutes to
	// the proxy, forwarding to LocalPort (Proxy.LocalServicePort).
	Checks    bool
	ServiceID string
	LocalPort int
}

const outcomePathLeftOut = "path not exposed: its listener port is not bound"

// readExpose reads p.Expose into c. A path that cannot be served safely is
// left out and refused by name; the rest of the registration is served.
func readExpose(c *proxyConfig, p *api.AgentServiceConnectProxyConfig) {
	c.Expose = exposeConfig{Checks: p.Expose.Checks, ServiceID: p.DestinationServiceID, LocalPort: p.LocalServicePort}
	if c.Expose.Checks && p.DestinationServiceID == "" {
		c.Refused = append(c.Refused, refusal{Setting: "Proxy.Expose.Checks", Value: "true",
			Outcome: "checks not exposed: the proxy names no DestinationServiceID whose checks the agent reroutes"})
		c.Expose.Checks = false
	}
	ports := map[int]bool{}
	for _, ep := range p.Expose.Paths {
		path := render.ExposedPath{Path: ep.Path, ListenerPort: ep.ListenerPort, LocalPathPort: ep.LocalPathPort,
			Protocol: strings.ToLower(ep.Protocol)}
		if path.Protocol == "" {
			path.Protocol = render.ExposeHTTP // Consul's default
		}
		value := fmt.Sprintf("%s on %d", ep.Path, ep.ListenerPort)
		if err := render.CheckExposedPath(path); err != nil {
			c.Refused = append(c.Refused, refusal{Setting: "Proxy.Expose.Paths", Value: value,
				Outcome: outcomePathLeftOut + " (" + err.Error() + ")"})
			continue
		}
		// Consul refuses two paths on one listener port at registration
		// (NodeService.Validate); should one get through, the first wins.
		if ports[path.ListenerPort] {
			c.Refused = append(c.Refused, refusal{Setting: "Proxy.Expose.Paths", Value: value,
				Outcome: outcomePathLeftOut + " (another path has this listener port)"})
			continue
		}
		ports[path.ListenerPort] = true
		c.Expose.Paths = append(c.Expose.Paths, path)
	}
}

// exposedChecksWatch is the poll of the agent's checks while the proxy
// registration asks for Expose.Checks.
type exposedChecksWatch struct {
	serviceID string
	cancel    context.CancelFunc
}

// syncExposedChecksWatchLocked starts the checks poll when the
// registration asks for Expose.Checks, and stops it when it no longer does
// (or names another service).
func (s *Sidecar) syncExposedChecksWatchLocked(ctx context.Context, reg *proxyConfig) {
	want := ""
	if reg.Expose.Checks {
		want = reg.Expose.ServiceID
	}
	if w := s.checksWatch; w != nil && w.serviceID != want {
		w.cancel()
		s.checksWatch, s.exposedChecks = nil, nil
	}
	if want == "" || s.checksWatch != nil {
		return
	}
	wctx, cancel := context.WithCancel(ctx)
	s.checksWatch = &exposedChecksWatch{serviceID: want, cancel: cancel}
	query := &consulwatch.ExposedChecksQuery{ServiceID: want}
	go consulwatch.Run(wctx, s.client, query, s.hooks(query), func(v *consulwatch.ExposedChecks) {
		s.update(func() {
			if wctx.Err() == nil {
				s.exposedChecks = v
			}
		})
	})
}

// exposedPaths are the listeners the model gets: the registered paths,
// then each exposed check whose path is known, forwarding to the
// service's port (Consul's API does not say which port a check called).
// A check on a port another listener has is left out (logged by
// logExposedChecks), since HAProxy cannot bind it twice.
func exposedPaths(reg *proxyConfig, checks *consulwatch.ExposedChecks) []render.ExposedPath {
	paths := append([]render.ExposedPath(nil), reg.Expose.Paths...)
	if !reg.Expose.Checks || checks == nil {
		return paths
	}
	taken := portsTaken(reg)
	for _, ch := range checks.Checks {
		if ch.Path == "" || taken[ch.ExposedPort] != "" {
			continue
		}
		p := render.ExposedPath{Path: ch.Path, ListenerPort: ch.ExposedPort, LocalPathPort: reg.Expose.LocalPort,
			Protocol: render.ExposeHTTP, CheckID: ch.CheckID, AllowSources: []string{checks.AgentAddr}}
		if ch.Type == "grpc" {
			p.Protocol = render.ExposeHTTP2
		}
		if render.CheckExposedPath(p) != nil {
			continue // logged by logExposedChecks
		}
		taken[ch.ExposedPort] = "check " + ch.CheckID
		paths = append(paths, p)
	}
	return paths
}

// portsTaken are the listener ports of reg, by what has them.
func portsTaken(reg *proxyConfig) map[int]string {
	taken := map[int]string{reg.BindPort: "the inbound listener"}
	for _, u := range reg.Upstreams {
		taken[u.BindPort] = "upstream " + u.Name
	}
	for _, p := range reg.Expose.Paths {
		taken[p.ListenerPort] = "exposed path " + p.Path
	}
	return taken
}

// exposedCheckLog says once per check and state why an exposed check is
// not served yet, or that it is: the agent's API leaves out what Envoy
// learns over xDS, so operators need to see what haconnect inferred.
func (s *Sidecar) logExposedChecks(reg *proxyConfig, checks *consulwatch.ExposedChecks) {
	if checks == nil || !reg.Expose.Checks {
		return
	}
	taken := portsTaken(reg)
	for _, ch := range checks.Checks {
		p := render.ExposedPath{Path: ch.Path, ListenerPort: ch.ExposedPort, LocalPathPort: reg.Expose.LocalPort,
			Protocol: render.ExposeHTTP, AllowSources: []string{checks.AgentAddr}}
		var state string
		var args []any
		switch err := render.CheckExposedPath(p); {
		case ch.Path == "":
			state = "waiting: the check's path is read from its output once the agent has run it"
		case taken[ch.ExposedPort] != "":
			state = "not exposed: its port is " + taken[ch.ExposedPort] + "'s"
		case err != nil:
			state = "not exposed: " + err.Error()
		default:
			state = "exposed"
			args = append(args, "path", ch.Path, "local_port", reg.Expose.LocalPort)
		}
		key := ch.CheckID + "|" + strconv.Itoa(ch.ExposedPort) + "|" + ch.Path + "|" + state
		if s.exposedLogged[key] {
			continue
		}
		if s.exposedLogged == nil {
			s.exposedLogged = map[string]bool{}
		}
		s.exposedLogged[key] = true
		args = append([]any{"check_id", ch.CheckID, "type", ch.Type, "exposed_port", ch.ExposedPort, "state", state}, args...)
		if strings.HasPrefix(state, "not exposed") {
			s.log.Warn("Proxy.Expose.Checks: check not served", args...)
		} else {
			s.log.Info("Proxy.Expose.Checks: check", args...)
		}
	}
}
