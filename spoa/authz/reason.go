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
	ReasonNoDestination
	ReasonTooManyDestinations
	ReasonConsulUnavailable
	ReasonConsulStale
	ReasonConsulInconsistent
	ReasonConsulError
	ReasonInternalError
	ReasonDestinationMismatch
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
	ReasonNoDestination:          "no_target",
	ReasonTooManyDestinations:    "too_many_targets",
	ReasonConsulUnavailable:      "consul_unavailable",
	ReasonConsulStale:            "consul_stale",
	ReasonConsulInconsistent:     "consul_inconsistent",
	ReasonConsulError:            "consul_error",
	ReasonInternalError:          "internal_error",
	ReasonDestinationMismatch:    "target_mismatch",
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
