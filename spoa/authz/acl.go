package authz

import (
	"fmt"
	"strings"

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

// explainWatchACL says what a watch needs when the agent refuses it, and
// whether it did refuse. Consul's text names the missing permission; the
// endpoint is added for the operator writing the policy.
func explainWatchACL(err error, what string) (error, bool) {
	if _, refused := consulflags.Refused(err); !refused {
		return err, false
	}
	if consulflags.UnknownToken(err) {
		return fmt.Errorf("%w (%s)", err, consulflags.UnknownTokenHint), true
	}
	endpoint := "the agent"
	switch {
	case strings.HasPrefix(what, "intentions for "):
		endpoint = "/v1/connect/intentions/match?by=destination&name=" + strings.TrimPrefix(what, "intentions for ")
	case strings.HasPrefix(what, "protocol of "):
		endpoint = "/v1/discovery-chain/" + strings.TrimPrefix(what, "protocol of ")
	case what == "CA roots":
		endpoint = "/v1/agent/connect/ca/roots"
	}
	return fmt.Errorf("%w (calling %s)", err, endpoint), true
}
