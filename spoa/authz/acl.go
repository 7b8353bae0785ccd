package authz

import (
	"fmt"

	"github.com/haconnect/haconnect/internal/consulflags"
)

// explainACL says what to fix when the agent refuses the authorize call
// for targetName. Consul's own text is kept (it names the permission).
func explainACL(err error, targetName string) error {
	if _, refused := consulflags.Refused(err); !refused {
		return err
	}
	if consulflags.UnknownToken(err) {
		return fmt.Errorf("%w (%s)", err, consulflags.UnknownTokenHint)
	}
	return fmt.Errorf("%w (the token needs service:write on %q to call /v1/agent/connect/authorize)", err, targetName)
}
