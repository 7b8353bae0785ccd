package sidecar

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/haconnect/haconnect/lua"
	"github.com/haconnect/haconnect/plugin/haproxy"
)

// fakeInstance stands for HAProxy at the seam between the plan and the
// applier: it records what it is asked and fails when told to. (The e2e
// tests run the applier against a real HAProxy.)
type fakeInstance struct {
	dir        string
	runtimeErr error
	reloadErr  error
	runtime    [][]haproxy.Command
	reloads    []string
	done       chan struct{}
}

func (f *fakeInstance) Reload(_ context.Context, text string) error {
	if f.reloadErr != nil {
		return f.reloadErr
	}
	f.reloads = append(f.reloads, text)
	return nil
}

func (f *fakeInstance) Runtime(cmds ...haproxy.Command) error {
	f.runtime = append(f.runtime, cmds)
	return f.runtimeErr
}

func (f *fakeInstance) Stop(time.Duration)    {}
func (f *fakeInstance) Done() <-chan struct{} { return f.done }
func (f *fakeInstance) Err() error            { return nil }
func (f *fakeInstance) ConfigPath() string    { return filepath.Join(f.dir, "haproxy.cfg") }

// fakeLauncher starts inst, or fails with err.
type fakeLauncher struct {
	inst    *fakeInstance
	err     error
	started []string
	cfg     haproxy.Config
}

func (l *fakeLauncher) Start(_ context.Context, cfg haproxy.Config, text string) (haproxy.Instance, error) {
	l.cfg = cfg
	if l.err != nil {
		return nil, l.err
	}
	l.started = append(l.started, text)
	return l.inst, nil
}

// testApplier is s's applier with its metrics in a registry of their own.
func testApplier(t *testing.T, s *Sidecar) (*applier, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	a := s.applier
	a.metrics = newMetrics(reg)
	return &a, reg
}

// applies reads haconnect_sidecar_applies_total by "method/result".
func applies(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "haconnect_sidecar_applies_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			got[l["method"]+"/"+l["result"]] = m.GetCounter().GetValue()
		}
	}
	return got
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// started is an applier that has started HAProxy (a fakeInstance) with
// one instance of api.
func started(t *testing.T) (*Sidecar, *applier, *fakeInstance, *prometheus.Registry) {
	t.Helper()
	inst := &fakeInstance{done: make(chan struct{})}
	l := &fakeLauncher{inst: inst}
	s := testSidecar(t, l)
	inst.dir = s.cfg.Dir
	a, reg := testApplier(t, s)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)
	if err := a.execute(context.Background(), planApply(a.proc != nil, a.applied, next), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if a.proc != haproxy.Instance(inst) || len(l.started) != 1 || l.started[0] != next.out.Config {
		t.Fatalf("start: proc %v, launched %d configurations", a.proc, len(l.started))
	}
	if l.cfg.Dir != s.cfg.Dir || l.cfg.AdminSocket != next.model.AdminSocket {
		t.Fatalf("started with %+v, want the working directory and the model's admin socket", l.cfg)
	}
	if !reflect.DeepEqual(a.applied, next) {
		t.Fatal("after a start, the applier does not hold the started state")
	}
	return s, a, inst, reg
}

func TestExecuteStartWritesEveryFileAndLaunches(t *testing.T) {
	s, _, _, reg := started(t)
	for name, want := range map[string]string{"leaf.pem": "LEAF\nKEY\n", "roots.pem": "ROOT\n",
		"haconnect.lua": string(lua.Telemetry), "upstream_peers.map": ""} {
		if got := readFile(t, s.path(name)); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if got := applies(t, reg); !reflect.DeepEqual(got, map[string]float64{"start/ok": 1}) {
		t.Fatalf("applies %v", got)
	}
}

func TestExecuteStartFailureKeepsNothingRunning(t *testing.T) {
	l := &fakeLauncher{err: errors.New("no image")}
	s := testSidecar(t, l)
	a, reg := testApplier(t, s)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), nil)
	if err := a.execute(context.Background(), planApply(false, a.applied, next), time.Time{}); err == nil {
		t.Fatal("a failed start was reported applied")
	}
	if a.proc != nil || a.applied.out != nil || a.applied.slots != nil {
		t.Fatalf("after a failed start: proc %v, applied %+v", a.proc, a.applied)
	}
	if got := applies(t, reg); !reflect.DeepEqual(got, map[string]float64{"start/error": 1}) {
		t.Fatalf("applies %v", got)
	}
}

func TestExecuteRuntimeSendsThePlannedCommands(t *testing.T) {
	s, a, inst, reg := started(t)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT2", 1, 2), a.applied.slots)
	p := planApply(true, a.applied, next)
	if err := a.execute(context.Background(), p, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if len(inst.runtime) != 1 || !reflect.DeepEqual(inst.runtime[0], p.runtime) || len(p.runtime) != 5 || inst.reloads != nil {
		t.Fatalf("runtime %v reloads %d, want the plan's 5 commands in one batch and no reload", inst.runtime, len(inst.reloads))
	}
	// The files a later reload or restart reads: the roots, and the
	// configuration with the new slot.
	if readFile(t, s.path("roots.pem")) != "ROOT2\n" || readFile(t, inst.ConfigPath()) != next.out.Config {
		t.Fatal("files not written after a runtime change")
	}
	if !reflect.DeepEqual(a.applied, p.next) || !a.applied.caCommitted {
		t.Fatal("the applier does not hold the new state (with its CA file committed)")
	}
	if got := applies(t, reg); got["runtime/ok"] != 1 || got["reload/ok"] != 0 {
		t.Fatalf("applies %v", got)
	}
}

func TestExecuteRuntimeRefusedFallsBackToReload(t *testing.T) {
	s, a, inst, reg := started(t)
	inst.runtimeErr = errors.New(`runtime "set server upstream_api/s2 addr 10.0.0.1 port 2": No such server.`)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1, 2), a.applied.slots)
	if err := a.execute(context.Background(), planApply(true, a.applied, next), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if len(inst.runtime) != 1 || len(inst.reloads) != 1 || inst.reloads[0] != next.out.Config {
		t.Fatalf("runtime %d, reloads %d: want the refused batch, then a reload of the new configuration", len(inst.runtime), len(inst.reloads))
	}
	if !reflect.DeepEqual(a.applied, next) {
		t.Fatal("the applier does not hold the reloaded state")
	}
	if got := applies(t, reg); !reflect.DeepEqual(got, map[string]float64{"start/ok": 1, "runtime/error": 1, "reload/ok": 1}) {
		t.Fatalf("applies %v", got)
	}
}

func TestExecuteReloadRefusedKeepsTheRunningState(t *testing.T) {
	s, a, inst, reg := started(t)
	prev := a.applied
	inst.reloadErr = errors.New("haproxy -c: refused")
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1, 2, 3, 4, 5), a.applied.slots)
	p := planApply(true, a.applied, next)
	if p.method != methodReload {
		t.Fatalf("plan %s, want a reload (more slots)", p.method)
	}
	if err := a.execute(context.Background(), p, time.Time{}); err == nil {
		t.Fatal("a refused reload was reported applied")
	}
	if !reflect.DeepEqual(a.applied, prev) || inst.runtime != nil {
		t.Fatal("after a refused reload the applier must still hold what HAProxy runs, slots included")
	}
	if got := applies(t, reg); got["reload/error"] != 1 || got["reload/ok"] != 0 {
		t.Fatalf("applies %v", got)
	}
}

func TestExecuteNothingTouchesNothing(t *testing.T) {
	s, a, inst, reg := started(t)
	next := stateOf(t, s, testSnapshot("LEAF", "ROOT", 1), a.applied.slots)
	if err := os.Remove(s.path("leaf.pem")); err != nil {
		t.Fatal(err)
	}
	if err := a.execute(context.Background(), planApply(true, a.applied, next), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if inst.runtime != nil || inst.reloads != nil {
		t.Fatal("nothing changed, yet HAProxy was asked something")
	}
	if _, err := os.Stat(s.path("leaf.pem")); !os.IsNotExist(err) {
		t.Fatal("nothing changed, yet a file was written")
	}
	if got := applies(t, reg); !reflect.DeepEqual(got, map[string]float64{"start/ok": 1}) {
		t.Fatalf("applies %v", got)
	}
}
