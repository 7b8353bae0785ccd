package authz

import (
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/consul/api"
)

// explainACL says what to fix when the agent refuses the authorize call
// for targetName with 403. Consul's own text is kept: since 1.14 it names
// the permission and the token's AccessorID (not secret); it never holds
// the token's SecretID, and neither does what is added here.
func explainACL(err error, targetName string) error {
	var se api.StatusError
	if !errors.As(err, &se) || se.Code != 403 {
		return err
	}
	if strings.Contains(se.Body, "ACL not found") {
		// An unknown or deleted token, not a weak one.
		return fmt.Errorf("%w (Consul does not know the ACL token: check -token, -token-file or CONSUL_HTTP_TOKEN)", err)
	}
	return fmt.Errorf("%w (the token needs service:write on %q to call /v1/agent/connect/authorize)", err, targetName)
}
