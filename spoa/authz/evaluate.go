package authz

import (
	"errors"
	"fmt"
	"slices"

	"github.com/hashicorp/consul/api"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ruleSet is what decides for one destination.
type ruleSet struct {
	intentions []*api.Intention // precedence order, as Consul returns them
	perms      []*Permissions   // compiled with intentions, by intention; nil for L4 intentions
	// protocol is the destination's protocol from its discovery chain
	// (service-defaults, then proxy-defaults, then tcp).
	protocol string
}

// defaultPolicyFunc tells the ACL default policy (allow or not) as it
// applies to caller, a caller no intention matches. When it cannot tell it
// returns the reason to deny with, and why.
type defaultPolicyFunc func(caller *Identity) (allow bool, failure Reason, err error)

// evaluate is the decision itself, from values only: the destination's
// rules, the cluster's trust domain, and the default policy. It applies
// the intentions (in precedence order) to the caller: the first whose
// source matches decides, as in Consul's RBAC rules for Envoy (an intention
// with HTTP permissions hands the decision to each request). A caller from
// another trust domain is denied first: intention sources name services of
// this cluster only.
//
// final says whether the decision may be cached or close an open
// connection; it is false when the default policy could not be learned,
// and err then says why.
func evaluate(rules *ruleSet, trustDomain string, id *Identity, policy defaultPolicyFunc) (d *Decision, final bool, err error) {
	if id.ID.TrustDomain().Name() != trustDomain {
		return newDecision(false, ReasonTrustDomain, id), true, nil
	}
	for i, ixn := range rules.intentions {
		if !sourceMatches(ixn, id) {
			continue
		}
		if len(ixn.Permissions) > 0 {
			return evaluateL7(rules, rules.perms[i], id, policy)
		}
		if ixn.Action == api.IntentionActionAllow {
			return newDecision(true, ReasonIntentionAllow, id), true, nil
		}
		return newDecision(false, ReasonIntentionDeny, id), true, nil
	}
	allow, failure, err := policy(id)
	if err != nil {
		return newDecision(false, failure, id), false, err
	}
	if allow {
		return newDecision(true, ReasonDefaultAllow, id), true, nil
	}
	return newDecision(false, ReasonDefaultDeny, id), true, nil
}

// evaluateL7 admits a caller whose intention carries HTTP permissions; its
// requests are checked one by one. On a destination that does not speak
// HTTP the permissions cannot be checked: that is a misconfiguration, and
// the caller is denied, as Consul's own proxies deny it.
func evaluateL7(rules *ruleSet, perms *Permissions, id *Identity, policy defaultPolicyFunc) (*Decision, bool, error) {
	if !IsHTTP(rules.protocol) {
		return newDecision(false, ReasonL7NotHTTP, id), true, nil
	}
	probe, ok := probeIdentity(rules.intentions, id)
	if !ok {
		return newDecision(false, ReasonConsulInconsistent, id), false, errors.New("every probe identity matches an intention")
	}
	allow, failure, err := policy(probe)
	if err != nil {
		return newDecision(false, failure, id), false, err
	}
	d := newDecision(true, ReasonL7Intention, id)
	d.L7, d.l7DefaultAllow = perms, allow
	return d, true, nil
}

// probeIdentity returns an identity no intention matches, in the caller's
// trust domain and datacenter, to ask the agent for the default policy
// (which it reports only for callers no intention matches).
func probeIdentity(list []*api.Intention, id *Identity) (*Identity, bool) {
	for _, ns := range []string{"default", "haconnect-probe"} {
		path := fmt.Sprintf("/ns/%s/dc/%s/svc/haconnect-default-policy-probe", ns, id.Datacenter)
		sid, err := spiffeid.FromPath(id.ID.TrustDomain(), path)
		if err != nil {
			return nil, false
		}
		probe, err := serviceIdentity(sid)
		if err != nil {
			return nil, false
		}
		if !slices.ContainsFunc(list, func(ixn *api.Intention) bool { return sourceMatches(ixn, &probe) }) {
			return &probe, true
		}
	}
	return nil, false
}

// sourceMatches mirrors Consul's matching of an intention's source against a
// local caller.
func sourceMatches(ixn *api.Intention, id *Identity) bool {
	if ixn.SourcePeer != "" || ixn.SourceSamenessGroup != "" {
		return false // a peer's callers carry another trust domain
	}
	if ixn.SourceType != "" && ixn.SourceType != api.IntentionSourceConsul {
		return false
	}
	if orDefault(ixn.SourcePartition) != id.Partition {
		return false
	}
	if ns := orDefault(ixn.SourceNS); ns != "*" && ns != id.Namespace {
		return false
	}
	return ixn.SourceName == "*" || ixn.SourceName == id.Service
}

func orDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
}
