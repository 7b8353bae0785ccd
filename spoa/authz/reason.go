package authz

// Reason says why a decision was made. The set is closed so that reasons can
// label metrics; String gives the short text HAProxy receives.
type Reason uint8

const (
	ReasonIntentionAllow Reason = iota + 1
	ReasonIntentionDeny
	ReasonDefaultAllow
	ReasonDefaultDeny
	ReasonL7Intention
	ReasonL7NotHTTP
	ReasonL7PermissionAllow
	ReasonL7PermissionDeny
	ReasonL7DefaultAllow
	ReasonL7DefaultDeny
	ReasonL7Unsupported
	ReasonL7Invalid
	ReasonL7BadRequest
	ReasonL7AmbiguousHeader
	ReasonNoCertificate
	ReasonBadCertificate
	ReasonUntrustedCertificate
	ReasonCertificateExpired
	ReasonCertificateNotYetValid
	ReasonNotSPIFFE
	ReasonNotService
	ReasonTrustDomain
	ReasonNoTarget
	ReasonTooManyTargets
	ReasonConsulUnavailable
	ReasonConsulStale
	ReasonConsulInconsistent
	ReasonConsulError
	ReasonInternalError
	ReasonTargetMismatch
	numReasons
)

var reasonText = [numReasons]string{
	ReasonIntentionAllow:         "intention_allow",
	ReasonIntentionDeny:          "intention_deny",
	ReasonDefaultAllow:           "default_allow",
	ReasonDefaultDeny:            "default_deny",
	ReasonL7Intention:            "l7_intention",
	ReasonL7NotHTTP:              "l7_intention_not_http",
	ReasonL7PermissionAllow:      "l7_permission_allow",
	ReasonL7PermissionDeny:       "l7_permission_deny",
	ReasonL7DefaultAllow:         "l7_default_allow",
	ReasonL7DefaultDeny:          "l7_default_deny",
	ReasonL7Unsupported:          "l7_jwt_unsupported",
	ReasonL7Invalid:              "l7_invalid_permission",
	ReasonL7BadRequest:           "l7_bad_request",
	ReasonL7AmbiguousHeader:      "l7_ambiguous_header",
	ReasonNoCertificate:          "no_certificate",
	ReasonBadCertificate:         "bad_certificate",
	ReasonUntrustedCertificate:   "untrusted_certificate",
	ReasonCertificateExpired:     "certificate_expired",
	ReasonCertificateNotYetValid: "certificate_not_yet_valid",
	ReasonNotSPIFFE:              "not_spiffe",
	ReasonNotService:             "not_a_service",
	ReasonTrustDomain:            "foreign_trust_domain",
	ReasonNoTarget:               "no_target",
	ReasonTooManyTargets:         "too_many_targets",
	ReasonConsulUnavailable:      "consul_unavailable",
	ReasonConsulStale:            "consul_stale",
	ReasonConsulInconsistent:     "consul_inconsistent",
	ReasonConsulError:            "consul_error",
	ReasonInternalError:          "internal_error",
	ReasonTargetMismatch:         "target_mismatch",
}

func (r Reason) String() string {
	if r == 0 || r >= numReasons {
		return "unknown"
	}
	return reasonText[r]
}

// Reasons lists every reason, for metric pre-registration and docs.
func Reasons() []Reason {
	out := make([]Reason, 0, numReasons-1)
	for r := Reason(1); r < numReasons; r++ {
		out = append(out, r)
	}
	return out
}

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
