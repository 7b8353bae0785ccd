package authz

import (
	"fmt"

	"github.com/haconnect/haconnect/internal/consulflags"
)

// explainACL says what to fix when the agent refuses the authorize call
// for destination. Consul's own text is kept (it names the permission).
func explainACL(err error, destination string) error {
	return consulflags.Explain(err, fmt.Sprintf("the token needs service:write on %q to call /v1/agent/connect/authorize", destination))
}
