package authz

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"
)

// NativeSet is an L7 intention's permissions in a form HAProxy can match
// with its own rules: methods and exact or prefix paths, nothing else. The
// sidecar loads the sets into HAProxy's maps, and the SPOA names a caller's
// set in its connection-level answer, so that each of the caller's
// requests is decided without a SPOE round trip. A set whose map entries
// are missing (not loaded yet, or withdrawn) falls back to the SPOA, which
// decides with the same Permissions.
type NativeSet struct {
	// ID names the set in HAProxy's maps: a hash of the destination, the
	// intention's source and its permissions, so that a change of any of
	// them is a new set and the old one can be withdrawn.
	ID string
	// Source is the intention's source as haconnect_spoa_l7_requests_total
	// labels it ("ns/name" outside the default namespace, or "*").
	Source string
	Rules  []NativeRule
}

// NativeRule is one permission of a NativeSet.
type NativeRule struct {
	Permission int // 1-based, as in the intention and the metrics
	Allow      bool
	// Methods the permission tests; nil for any method.
	Methods []string
	Path    NativePath
}

// NativePath is a permission's path test.
type NativePath struct {
	Kind  NativePathKind
	Value string
}

// NativePathKind says how a path is matched.
type NativePathKind uint8

const (
	NativeAnyPath NativePathKind = iota
	NativeExactPath
	NativePrefixPath
)

// MaxNativeRules bounds the permissions of a set matched natively (its map
// values carry the permission's number in four digits).
const MaxNativeRules = 999

// compileNative returns the native form of ixn's permissions, or nil when
// one of them tests something HAProxy's maps cannot (a header, a regular
// expression, a JWT) or cannot be compiled: the SPOA then decides each
// request, as before.
func compileNative(destination, source string, p *Permissions) *NativeSet {
	if p.invalid != 0 || p.NeedsHeaders || len(p.rules) == 0 || len(p.rules) > MaxNativeRules {
		return nil
	}
	set := &NativeSet{Source: source, Rules: make([]NativeRule, 0, len(p.rules))}
	h := sha256.New()
	fmt.Fprintf(h, "%q %q", destination, source)
	for i := range p.rules {
		r := &p.rules[i]
		if r.jwt || len(r.headers) > 0 || r.path.ignoreCase {
			return nil
		}
		nr := NativeRule{Permission: i + 1, Allow: r.allow, Methods: slices.Clone(r.methods)}
		switch r.path.kind {
		case matchAny:
		case matchExact:
			nr.Path = NativePath{Kind: NativeExactPath, Value: r.path.value}
		case matchPrefix:
			nr.Path = NativePath{Kind: NativePrefixPath, Value: r.path.value}
		default:
			return nil
		}
		// A method or path HAProxy's map keys cannot carry (a key ends at
		// white space; '|' and ':' separate the parts of a key, "*"
		// stands for the methods the set does not name) stays with the
		// SPOA.
		if !nativeSafe(nr.Path.Value) || slices.ContainsFunc(nr.Methods, func(m string) bool { return m == "" || m == "*" || !nativeSafe(m) || strings.ContainsAny(m, ":|") }) {
			return nil
		}
		fmt.Fprintf(h, " %d %t %q %d %q", nr.Permission, nr.Allow, nr.Methods, nr.Path.Kind, nr.Path.Value)
		set.Rules = append(set.Rules, nr)
	}
	set.ID = hex.EncodeToString(h.Sum(nil)[:8])
	return set
}

// nativeSafe reports whether s can be part of a map key: no white space,
// no control character and nothing outside ASCII (HAProxy's map files and
// runtime API split on white space and read escapes), no ';' (the runtime
// API's command separator) and no '#' (a comment in a map file).
func nativeSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == '\\' || c == '#' || c == ';' {
			return false
		}
	}
	return true
}

// NativeSets lists the native sets of destination's current intentions, in
// the intentions' order. It lists none before the intentions are loaded
// and past the stale window: every request then goes to the SPOA, which
// denies it for the same reason. OnChange reports every change of the
// list.
func (a *Authorizer) NativeSets(destination string) []*NativeSet {
	a.mu.RLock()
	t := a.destinations[destination]
	a.mu.RUnlock()
	if t == nil {
		return nil
	}
	// An answer counts from when its apply returns: during the first
	// one's (which reports this change), the status is not loaded yet,
	// and the rules hold nothing older than that answer.
	if t.intentions.IsLoaded() && !a.fresh(t, time.Now()) {
		return nil
	}
	t.mu.RLock()
	rules := t.rules
	t.mu.RUnlock()
	if !IsHTTP(rules.protocol) {
		return nil
	}
	var out []*NativeSet
	for _, p := range rules.perms {
		if p != nil && p.native != nil {
			out = append(out, p.native)
		}
	}
	return out
}

// NativeSetID names the set HAProxy may match this decision's requests
// with ("" when the SPOA must decide them), and whether a request no
// permission matches is allowed.
func (d *Decision) NativeSetID() (id string, defaultAllow bool) {
	if !d.Allow || d.L7 == nil || d.L7.native == nil {
		return "", false
	}
	return d.L7.native.ID, d.l7DefaultAllow
}
