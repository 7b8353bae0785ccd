package authz

import (
	"errors"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestExplainACL(t *testing.T) {
	weak := api.StatusError{Code: 403, Body: `Permission denied: token with AccessorID 'a1' lacks permission 'service:write' on "api"`}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{weak, `Unexpected response code: 403 (Permission denied: token with AccessorID 'a1' lacks permission 'service:write' on "api") ` +
			`(the token needs service:write on "api" to call /v1/agent/connect/authorize)`},
		{api.StatusError{Code: 403, Body: "ACL not found"}, `Unexpected response code: 403 (ACL not found) ` +
			`(Consul does not know the ACL token: check -token, -token-file or CONSUL_HTTP_TOKEN)`},
		{api.StatusError{Code: 500, Body: "rpc error"}, "Unexpected response code: 500 (rpc error)"},
		{errors.New("connection refused"), "connection refused"},
	} {
		got := explainACL(tc.err, "api")
		if got.Error() != tc.want {
			t.Errorf("explainACL(%v)\n got %s\nwant %s", tc.err, got, tc.want)
		}
		if !errors.Is(got, tc.err) {
			t.Errorf("explainACL(%v) does not wrap the error", tc.err)
		}
	}
}
