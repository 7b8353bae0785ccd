package sidecar

import (
	"errors"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestExplainRefusal(t *testing.T) {
	lacks := api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID 'a1' lacks permission 'service:read' on "web-sidecar-proxy"`}
	for _, tc := range []struct {
		what string
		err  error
		want string
	}{
		{"proxy registration web-1-sidecar-proxy", lacks, lacks.Error() + " (calling /v1/agent/service/web-1-sidecar-proxy)"},
		{"instances of api@dc2", api.StatusError{Code: 403, Body: "Permission denied"},
			`Unexpected response code: 403 (Permission denied) (the token needs service:read on "api" to call /v1/health/connect/api)`},
		{"leaf certificate", api.StatusError{Code: 403, Body: "ACL not found"},
			"Unexpected response code: 403 (ACL not found) (Consul does not know the ACL token: check -token, -token-file or CONSUL_HTTP_TOKEN)"},
		{"something new", lacks, lacks.Error()},
	} {
		got := explainRefusal(tc.what, tc.err)
		if got.Error() != tc.want || !errors.Is(got, tc.err) {
			t.Errorf("%s: %v\n got %s\nwant %s", tc.what, tc.err, got, tc.want)
		}
	}
}
