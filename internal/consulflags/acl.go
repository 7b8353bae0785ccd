package consulflags

import (
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/consul/api"
)

// UnknownTokenHint is what to check when Consul does not know the token.
const UnknownTokenHint = "Consul does not know the ACL token: check -token, -token-file or CONSUL_HTTP_TOKEN"

// Refused returns Consul's answer when it refused a call for the ACL token
// (HTTP 403). Since 1.14 the answer names the missing permission and the
// token's AccessorID (not secret), never its SecretID.
func Refused(err error) (api.StatusError, bool) {
	var se api.StatusError
	if errors.As(err, &se) && se.Code == 403 {
		return se, true
	}
	return se, false
}

// Explain adds what to fix to an error of Consul refusing the ACL token,
// keeping Consul's own text (it names the missing permission): the hint
// about an unknown token, else fix. Other errors are returned unchanged.
func Explain(err error, fix string) error {
	if _, refused := Refused(err); !refused {
		return err
	}
	if UnknownToken(err) {
		return fmt.Errorf("%w (%s)", err, UnknownTokenHint)
	}
	return fmt.Errorf("%w (%s)", err, fix)
}

// UnknownToken reports whether err is Consul refusing a token it does not
// know ("ACL not found"), as opposed to a known token lacking a permission.
func UnknownToken(err error) bool {
	se, ok := Refused(err)
	return ok && strings.Contains(se.Body, "ACL not found")
}
