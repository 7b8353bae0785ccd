package authz

import (
	"errors"
	"testing"

	"github.com/hashicorp/consul/api"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func caller(t *testing.T, uri string) *Identity {
	t.Helper()
	sid, err := spiffeid.FromString(uri)
	if err != nil {
		t.Fatal(err)
	}
	id, err := serviceIdentity(sid)
	if err != nil {
		t.Fatal(err)
	}
	return &id
}

func ixn(source string, action api.IntentionAction) *api.Intention {
	return &api.Intention{SourceName: source, Action: action}
}

func ixnNS(ns, source string, action api.IntentionAction) *api.Intention {
	return &api.Intention{SourceNS: ns, SourceName: source, Action: action}
}

// policy is a fixed default policy, or one that cannot be learned.
func policy(allow bool, err error) defaultPolicyFunc {
	return func(*Identity) (bool, Reason, error) {
		if err != nil {
			return false, ReasonConsulError, err
		}
		return allow, 0, nil
	}
}

// TestEvaluatePrecedence covers, without Consul, how the intentions (in
// the precedence order Consul returns them) and the default policy decide:
// the first intention whose source matches decides and nothing after it.
func TestEvaluatePrecedence(t *testing.T) {
	const (
		allow = api.IntentionActionAllow
		deny  = api.IntentionActionDeny
		td    = "11111111-2222-3333-4444-555555555555.consul"
	)
	web := "spiffe://" + td + "/ns/default/dc/dc1/svc/web"
	webInTeam := "spiffe://" + td + "/ns/team/dc/dc1/svc/web"
	webInPartition := "spiffe://" + td + "/ap/blue/ns/default/dc/dc1/svc/web"
	batch := "spiffe://" + td + "/ns/default/dc/dc1/svc/batch"
	foreign := "spiffe://other.consul/ns/default/dc/dc1/svc/web"
	broken := errors.New("no leader")
	httpPerm := &api.Intention{SourceName: "web", Permissions: []*api.IntentionPermission{
		{Action: allow, HTTP: &api.IntentionHTTPPermission{PathPrefix: "/v1"}},
	}}
	for _, tc := range []struct {
		name       string
		intentions []*api.Intention
		protocol   string
		caller     string
		policy     defaultPolicyFunc
		allow      bool
		reason     Reason
		final      bool
	}{
		{"no intention, default allow", nil, "tcp", web, policy(true, nil), true, ReasonDefaultAllow, true},
		{"no intention, default deny", nil, "tcp", web, policy(false, nil), false, ReasonDefaultDeny, true},
		{"no intention, default unknown: not final", nil, "tcp", web, policy(false, broken), false, ReasonConsulError, false},
		{"exact allow", []*api.Intention{ixn("web", allow)}, "tcp", web, policy(false, nil), true, ReasonIntentionAllow, true},
		{"exact deny beats default allow", []*api.Intention{ixn("web", deny)}, "tcp", web, policy(true, nil), false, ReasonIntentionDeny, true},
		{"exact before wildcard: exact decides", []*api.Intention{ixn("web", allow), ixn("*", deny)}, "tcp", web, policy(false, nil), true, ReasonIntentionAllow, true},
		{"wildcard decides for the others", []*api.Intention{ixn("web", allow), ixn("*", deny)}, "tcp", batch, policy(true, nil), false, ReasonIntentionDeny, true},
		{"first match decides, not the later", []*api.Intention{ixn("web", deny), ixn("web", allow)}, "tcp", web, policy(true, nil), false, ReasonIntentionDeny, true},
		{"another source: the default", []*api.Intention{ixn("batch", deny)}, "tcp", web, policy(true, nil), true, ReasonDefaultAllow, true},
		{"namespace must match", []*api.Intention{ixn("web", deny)}, "tcp", webInTeam, policy(true, nil), true, ReasonDefaultAllow, true},
		{"namespace wildcard", []*api.Intention{ixnNS("*", "web", deny)}, "tcp", webInTeam, policy(true, nil), false, ReasonIntentionDeny, true},
		{"named namespace", []*api.Intention{ixnNS("team", "*", deny)}, "tcp", webInTeam, policy(true, nil), false, ReasonIntentionDeny, true},
		{"partition must match", []*api.Intention{ixn("*", deny)}, "tcp", webInPartition, policy(true, nil), true, ReasonDefaultAllow, true},
		{"a peer's source never matches a local caller", []*api.Intention{{SourcePeer: "east", SourceName: "web", Action: deny}}, "tcp", web, policy(true, nil), true, ReasonDefaultAllow, true},
		{"foreign trust domain before anything", []*api.Intention{ixn("*", allow)}, "tcp", foreign, policy(true, nil), false, ReasonTrustDomain, true},
		{"HTTP permissions admit the caller", []*api.Intention{httpPerm, ixn("*", deny)}, "http", web, policy(false, nil), true, ReasonL7Intention, true},
		{"HTTP permissions on a TCP destination", []*api.Intention{httpPerm}, "tcp", web, policy(true, nil), false, ReasonL7NotHTTP, true},
		{"HTTP permissions, default unknown: not final", []*api.Intention{httpPerm}, "http", web, policy(true, broken), false, ReasonConsulError, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rules := &ruleSet{intentions: tc.intentions, protocol: tc.protocol, perms: make([]*Permissions, len(tc.intentions))}
			for i, x := range tc.intentions {
				if len(x.Permissions) > 0 {
					rules.perms[i] = compilePermissions("api", x, nil)
				}
			}
			d, final, err := evaluate(rules, td, caller(t, tc.caller), tc.policy)
			if d.Allow != tc.allow || d.Reason != tc.reason || final != tc.final {
				t.Fatalf("got allow=%v %s final=%v (err %v), want allow=%v %s final=%v", d.Allow, d.Reason, final, err, tc.allow, tc.reason, tc.final)
			}
			if (err != nil) == final {
				t.Fatalf("final=%v with err %v: an error must come with a decision that is not final", final, err)
			}
		})
	}
}

// TestEvaluateOrderIsExhaustive: for every pair of intentions on sources
// that both match the caller, the first decides, whatever the actions.
func TestEvaluateOrderIsExhaustive(t *testing.T) {
	const td = "td.consul"
	id := caller(t, "spiffe://td.consul/ns/default/dc/dc1/svc/web")
	sources := []*api.Intention{
		{SourceName: "web"}, {SourceName: "*"}, {SourceNS: "*", SourceName: "*"}, {SourceNS: "default", SourceName: "web"},
	}
	for _, first := range sources {
		for _, second := range sources {
			for _, a1 := range []api.IntentionAction{api.IntentionActionAllow, api.IntentionActionDeny} {
				for _, a2 := range []api.IntentionAction{api.IntentionActionAllow, api.IntentionActionDeny} {
					x1, x2 := *first, *second
					x1.Action, x2.Action = a1, a2
					rules := &ruleSet{intentions: []*api.Intention{&x1, &x2}, perms: make([]*Permissions, 2), protocol: "tcp"}
					d, _, _ := evaluate(rules, td, id, policy(a1 != api.IntentionActionAllow, nil))
					if want := a1 == api.IntentionActionAllow; d.Allow != want {
						t.Errorf("%s/%s %s then %s/%s %s: allow=%v, want the first to decide",
							x1.SourceNS, x1.SourceName, a1, x2.SourceNS, x2.SourceName, a2, d.Allow)
					}
				}
			}
		}
	}
}
