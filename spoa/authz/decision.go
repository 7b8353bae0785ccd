package authz

// Decision is an authorization answer. Decisions are shared between callers
// and cached: treat them as read-only.
type Decision struct {
	Allow  bool
	Reason Reason
	// Source is the caller's service name and SPIFFE its SPIFFE ID; both are
	// empty when the certificate could not be read.
	Source string
	SPIFFE string
	// Boxed holds the strings above already converted to `any`. The SPOE
	// library takes variable values as `any`; boxing a string allocates, so
	// a cached decision pays that once instead of on every request.
	Boxed struct{ Reason, Source, SPIFFE any }

	// L7 is set when the caller's intention carries HTTP permissions: the
	// decision (Allow, ReasonL7Intention) only admits the connection, and
	// each request must then pass CheckRequest.
	L7 *Permissions
	// l7DefaultAllow is the ACL default policy, for requests no permission
	// matches.
	l7DefaultAllow bool
}

// L7Mode tells HAProxy what each request must send: 0 nothing (the
// decision is final), 1 the method and path, 2 the headers as well.
func (d *Decision) L7Mode() int {
	switch {
	case d.L7 == nil:
		return 0
	case d.L7.NeedsHeaders:
		return 2
	default:
		return 1
	}
}

// CheckRequest decides one HTTP request of a caller that this decision
// admitted: a connection-level denial stands, a decision without HTTP
// permissions stands, and otherwise the permissions decide.
func (d *Decision) CheckRequest(r *Request) (bool, Reason) {
	if !d.Allow || d.L7 == nil {
		return d.Allow, d.Reason
	}
	return d.L7.Check(r, d.l7DefaultAllow)
}

func newDecision(allow bool, reason Reason, id *Identity) *Decision {
	d := &Decision{Allow: allow, Reason: reason}
	if id != nil {
		d.Source = id.Service
		d.SPIFFE = id.ID.String()
	}
	d.Boxed.Reason = reason.String()
	d.Boxed.Source = d.Source
	d.Boxed.SPIFFE = d.SPIFFE
	return d
}

// fixed holds the decisions that do not depend on a caller, so that denying
// bad input allocates nothing.
var fixed [numReasons]*Decision

func init() {
	for r := Reason(1); r < numReasons; r++ {
		fixed[r] = newDecision(false, r, nil)
	}
}

// Deny returns the shared, caller-less denial for r.
func Deny(r Reason) *Decision { return fixed[r] }
