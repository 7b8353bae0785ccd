package consulwatch

import (
	"errors"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestExplainRefusal(t *testing.T) {
	lacks := api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID 'a1' lacks permission 'service:read' on "web-sidecar-proxy"`}
	for _, tc := range []struct {
		endpoint string
		err      error
		want     string
	}{
		{"/v1/agent/service/web-1-sidecar-proxy", lacks, lacks.Error() + " (calling /v1/agent/service/web-1-sidecar-proxy)"},
		{"/v1/health/connect/api", api.StatusError{Code: 403, Body: "Permission denied"},
			`Unexpected response code: 403 (Permission denied) (the token needs service:read on "api" to call /v1/health/connect/api)`},
		{"/v1/health/connect/api", lacks, lacks.Error() + " (calling /v1/health/connect/api)"},
		{"/v1/agent/connect/ca/leaf/web", api.StatusError{Code: 403, Body: "ACL not found"},
			"Unexpected response code: 403 (ACL not found) (Consul does not know the ACL token: check -token, -token-file or CONSUL_HTTP_TOKEN)"},
		{"/v1/agent/connect/ca/roots", api.StatusError{Code: 500, Body: "rpc error"}, "Unexpected response code: 500 (rpc error)"},
	} {
		got := ExplainRefusal(tc.endpoint, tc.err)
		if got.Error() != tc.want || !errors.Is(got, tc.err) {
			t.Errorf("%s: %v\n got %s\nwant %s", tc.endpoint, tc.err, got, tc.want)
		}
	}
}
