// Package nomad finds, from inside a Nomad allocation, which Connect service
// a sidecar task serves and the Consul ID of that service's sidecar proxy.
//
// Nomad registers group services in Consul with the ID
//
//	_nomad-task-<allocID>-group-<group>-<service>-<portLabel>
//
// and the Connect sidecar proxy with that ID plus "-sidecar-proxy"
// (Nomad's command/agent/consul and client/serviceregistration:
// MakeAllocServiceID, with the task name "group-<group>" for group
// services). Both sides of this package speak only nomad/api types.
package nomad

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/hashicorp/nomad/api"
)

// Env is the task environment Nomad gives a sidecar task.
type Env struct {
	AllocID    string // NOMAD_ALLOC_ID
	Group      string // NOMAD_GROUP_NAME
	Task       string // NOMAD_TASK_NAME
	Namespace  string // NOMAD_NAMESPACE
	SecretsDir string // NOMAD_SECRETS_DIR
}

// EnvFromOS reads the task environment; NOMAD_ALLOC_ID is required.
func EnvFromOS() (Env, error) {
	e := Env{
		AllocID:    os.Getenv("NOMAD_ALLOC_ID"),
		Group:      os.Getenv("NOMAD_GROUP_NAME"),
		Task:       os.Getenv("NOMAD_TASK_NAME"),
		Namespace:  os.Getenv("NOMAD_NAMESPACE"),
		SecretsDir: os.Getenv("NOMAD_SECRETS_DIR"),
	}
	if e.AllocID == "" {
		return e, errors.New("NOMAD_ALLOC_ID is not set: run nomad-hook as a task of a Nomad allocation (or set the variables by hand)")
	}
	return e, nil
}

// Target is the sidecar one hook serves.
type Target struct {
	AllocID string
	Group   string
	Service string
	// ProxyID is the Consul service ID of the Connect sidecar proxy.
	ProxyID string
	// Upstreams names the destinations the job declares (for logs).
	Upstreams []string
}

// ServiceID is the Consul ID Nomad gives a group service.
func ServiceID(allocID, group, service, portLabel string) string {
	return fmt.Sprintf("_nomad-task-%s-group-%s-%s-%s", allocID, group, service, portLabel)
}

// ProxyID is the Consul ID of that service's Connect sidecar proxy.
func ProxyID(allocID, group, service, portLabel string) string {
	return ServiceID(allocID, group, service, portLabel) + "-sidecar-proxy"
}

// Lookup reads the allocation from Nomad and resolves the target.
func Lookup(ctx context.Context, client *api.Client, env Env, service string) (*Target, error) {
	q := (&api.QueryOptions{Namespace: env.Namespace}).WithContext(ctx)
	alloc, _, err := client.Allocations().Info(env.AllocID, q)
	if err != nil {
		return nil, fmt.Errorf("allocation %s: %w", env.AllocID, err)
	}
	return Resolve(alloc, env, service)
}

// ResolveError is an allocation that does not say which sidecar to run: a
// final answer, not worth retrying.
type ResolveError struct{ msg string }

func (e *ResolveError) Error() string { return e.msg }

func resolveErr(format string, args ...any) error {
	return &ResolveError{msg: fmt.Sprintf(format, args...)}
}

// Resolve picks the Connect service of the task's group: the one named by
// service, else the one the task's name designates (Nomad names its
// injected sidecar task connect-proxy-<service>), else the only one.
func Resolve(alloc *api.Allocation, env Env, service string) (*Target, error) {
	group := env.Group
	if group == "" {
		group = alloc.TaskGroup
	}
	if alloc.Job == nil {
		return nil, resolveErr("allocation %s carries no job", alloc.ID)
	}
	var tg *api.TaskGroup
	for _, g := range alloc.Job.TaskGroups {
		if g.Name != nil && *g.Name == group {
			tg = g
		}
	}
	if tg == nil {
		return nil, resolveErr("allocation %s: job %s has no group %q", alloc.ID, deref(alloc.Job.ID), group)
	}
	connect := map[string]*api.Service{}
	var names []string
	for _, s := range tg.Services {
		if s.Connect != nil && s.Connect.SidecarService != nil {
			connect[s.Name] = s
			names = append(names, s.Name)
		}
	}
	sort.Strings(names)
	if service == "" {
		if s, ok := strings.CutPrefix(env.Task, "connect-proxy-"); ok {
			service = s
		} else if len(names) == 1 {
			service = names[0]
		}
	}
	svc := connect[service]
	switch {
	case len(names) == 0:
		return nil, resolveErr("group %q declares no service with connect { sidecar_service {} }", group)
	case service == "":
		return nil, resolveErr("group %q has several Connect services (%s): name one with -service", group, strings.Join(names, ", "))
	case svc == nil:
		return nil, resolveErr("group %q has no Connect service %q (it has: %s)", group, service, strings.Join(names, ", "))
	}
	t := &Target{AllocID: alloc.ID, Group: group, Service: svc.Name,
		ProxyID: ProxyID(alloc.ID, group, svc.Name, svc.PortLabel)}
	if p := svc.Connect.SidecarService.Proxy; p != nil {
		for _, u := range p.Upstreams {
			t.Upstreams = append(t.Upstreams, u.DestinationName)
		}
	}
	return t, nil
}

// Alive reports whether an allocation still needs its sidecar: it exists
// and its client status is not terminal.
func Alive(ctx context.Context, client *api.Client, allocID string) (bool, error) {
	alloc, _, err := client.Allocations().Info(allocID, (&api.QueryOptions{Namespace: "*"}).WithContext(ctx))
	if err != nil {
		var se api.UnexpectedResponseError
		if errors.As(err, &se) && se.StatusCode() == 404 {
			return false, nil
		}
		return false, err
	}
	return !alloc.ClientTerminalStatus(), nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
