package nomad

import (
	"strings"
	"testing"

	"github.com/hashicorp/nomad/api"
)

func alloc(services ...string) *api.Allocation {
	name := "api"
	tg := &api.TaskGroup{Name: &name}
	for _, s := range services {
		tg.Services = append(tg.Services, &api.Service{Name: s, PortLabel: "http",
			Connect: &api.ConsulConnect{SidecarService: &api.ConsulSidecarService{Proxy: &api.ConsulProxy{
				Upstreams: []*api.ConsulUpstream{{DestinationName: "db", LocalBindPort: 5432}}}}}})
	}
	tg.Services = append(tg.Services, &api.Service{Name: "plain", PortLabel: "x"})
	job := "demo"
	return &api.Allocation{ID: "0a1b", TaskGroup: "api", Job: &api.Job{ID: &job, TaskGroups: []*api.TaskGroup{tg}}}
}

func TestResolve(t *testing.T) {
	for _, tc := range []struct {
		name    string
		alloc   *api.Allocation
		env     Env
		service string
		want    string
		wantErr string
	}{
		{"the only Connect service", alloc("api"), Env{}, "", "_nomad-task-0a1b-group-api-api-http-sidecar-proxy", ""},
		{"named by the injected task", alloc("api", "admin"), Env{Task: "connect-proxy-admin"}, "", "_nomad-task-0a1b-group-api-admin-http-sidecar-proxy", ""},
		{"named by the flag", alloc("api", "admin"), Env{Task: "hook"}, "admin", "_nomad-task-0a1b-group-api-admin-http-sidecar-proxy", ""},
		{"ambiguous", alloc("api", "admin"), Env{Task: "hook"}, "", "", "several Connect services (admin, api)"},
		{"not a Connect service", alloc("api"), Env{}, "plain", "", "no Connect service \"plain\""},
		{"no Connect service", alloc(), Env{}, "", "", "declares no service with connect"},
		{"unknown group", alloc("api"), Env{Group: "web"}, "", "", "has no group \"web\""},
	} {
		got, err := Resolve(tc.alloc, tc.env, tc.service)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got.ProxyID != tc.want {
			t.Errorf("%s: %+v %v, want proxy %s", tc.name, got, err, tc.want)
		}
	}
	got, _ := Resolve(alloc("api"), Env{}, "")
	if len(got.Upstreams) != 1 || got.Upstreams[0] != "db" {
		t.Errorf("upstreams %v", got.Upstreams)
	}
}
