package sidecar

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haconnect/haconnect/internal/consulwatch"
	"github.com/haconnect/haconnect/plugin/render"
)

// An upstream not loaded yet holds the snapshot back only while its watch
// neither failed nor exceeded upstreamGrace; then it is given up on once
// (reported in unread), and its first answer fills it in.
func TestUnreadUpstreamIsGivenUpOnOnceThenFilledIn(t *testing.T) {
	w := newWatched()
	w.reg = &proxyConfig{Service: "web", Upstreams: []render.Upstream{{Name: "api"}, {Name: "db", Datacenter: "nowhere"}, {Name: "slow"}}}
	w.leaf, w.roots = &api.LeafCert{}, &api.CARootList{}
	w.endpoints["api"] = []endpoint{{Addr: "127.0.0.1", Port: 1}}
	failing := consulwatch.NewStatus()
	w.watching["api"] = &upstreamWatch{status: consulwatch.NewStatus(), started: time.Now()}
	w.watching["db@nowhere"] = &upstreamWatch{status: failing, started: time.Now()}
	w.watching["slow"] = &upstreamWatch{status: consulwatch.NewStatus(), started: time.Now()}

	if snap := w.snapshot(); len(snap.missing) != 2 || len(snap.unread) != 0 {
		t.Fatalf("before any failure: missing %v, unread %v; want db@nowhere and slow waited for", snap.missing, snap.unread)
	}

	// db's watch fails, as Consul answers "No path to datacenter".
	ctx, cancel := context.WithCancel(context.Background())
	cause := errors.New("No path to datacenter")
	watch := consulwatch.Watch{Status: failing, Fetch: func(context.Context, *api.QueryOptions) (consulwatch.Result, error) {
		return consulwatch.Result{}, cause
	}, OnFailing: func(err error) { w.update(func() { w.watching["db@nowhere"].err = err }); cancel() }}
	watch.Run(ctx)
	snap := w.snapshot()
	if len(snap.missing) != 1 || snap.missing[0] != "instances of slow" {
		t.Fatalf("after db's failure: missing %v, want only slow", snap.missing)
	}
	if len(snap.unread) != 1 || snap.unread[0].key != "db@nowhere" || snap.unread[0].err != cause {
		t.Fatalf("after db's failure: unread %v, want db@nowhere with its error", snap.unread)
	}

	// slow never answered: past the grace it is given up on too, and db
	// is not reported again.
	w.watching["slow"].started = time.Now().Add(-upstreamGrace)
	snap = w.snapshot()
	if len(snap.missing) != 0 || len(snap.unread) != 1 || snap.unread[0].key != "slow" {
		t.Fatalf("past the grace: missing %v, unread %v; want slow given up on, alone", snap.missing, snap.unread)
	}
	if snap = w.snapshot(); len(snap.missing) != 0 || len(snap.unread) != 0 || len(snap.endpoints["db@nowhere"]) != 0 {
		t.Fatalf("later: missing %v, unread %v, db %v; want nothing new and db empty", snap.missing, snap.unread, snap.endpoints["db@nowhere"])
	}

	// db's first answer fills it in.
	w.update(func() { w.endpoints["db@nowhere"] = []endpoint{{Addr: "127.0.0.2", Port: 2}} })
	if snap = w.snapshot(); len(snap.endpoints["db@nowhere"]) != 1 {
		t.Fatalf("after db's answer: %v", snap.endpoints["db@nowhere"])
	}
}
