// Package jobs_test checks the Nomad job files: valid HCL, and only
// stanzas and attributes Nomad's jobspec accepts where they are used.
// (Decoding into nomad/api types with gohcl panics on jobspec's custom
// decoders, so the check walks hcl.BodySchema trees written from Nomad's
// job specification documentation.)
package jobs_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"github.com/zclconf/go-cty/cty"
)

// stanza is what a block may hold.
type stanza struct {
	labels   []string
	attrs    []string
	blocks   map[string]*stanza
	freeform bool // driver config, env, meta: anything goes
}

var freeform = &stanza{freeform: true}

func (s *stanza) schema() *hcl.BodySchema {
	bs := &hcl.BodySchema{}
	for _, a := range s.attrs {
		bs.Attributes = append(bs.Attributes, hcl.AttributeSchema{Name: a})
	}
	for name, b := range s.blocks {
		bs.Blocks = append(bs.Blocks, hcl.BlockHeaderSchema{Type: name, LabelNames: b.labels})
	}
	return bs
}

var (
	resources = &stanza{attrs: []string{"cpu", "cores", "memory", "memory_max"}}
	check     = &stanza{attrs: []string{"name", "type", "port", "path", "interval", "timeout", "protocol", "expose", "method"}}
	upstreams = &stanza{attrs: []string{"destination_name", "destination_namespace", "local_bind_port", "local_bind_address", "datacenter", "config"}}
	proxy     = &stanza{attrs: []string{"local_service_address", "local_service_port", "config"},
		blocks: map[string]*stanza{"upstreams": upstreams, "config": freeform}}
	sidecarTask = &stanza{attrs: []string{"name", "driver", "user", "kill_timeout", "shutdown_delay", "kill_signal"},
		blocks: map[string]*stanza{"config": freeform, "env": freeform, "meta": freeform, "resources": resources,
			"logs": {attrs: []string{"max_files", "max_file_size"}}}}
	connect = &stanza{attrs: []string{"native"}, blocks: map[string]*stanza{
		"sidecar_service": {attrs: []string{"port", "tags", "disable_default_tcp_check"}, blocks: map[string]*stanza{"proxy": proxy, "check": check}},
		"sidecar_task":    sidecarTask,
	}}
	service = &stanza{attrs: []string{"name", "port", "tags", "provider", "address_mode", "task"},
		blocks: map[string]*stanza{"connect": connect, "check": check, "meta": freeform}}
	task = &stanza{labels: []string{"name"}, attrs: []string{"driver", "kind", "user", "kill_timeout", "kill_signal", "shutdown_delay", "leader"},
		blocks: map[string]*stanza{
			"config": freeform, "env": freeform, "meta": freeform, "resources": resources, "service": service,
			"lifecycle": {attrs: []string{"hook", "sidecar"}},
			"identity":  {attrs: []string{"name", "env", "file", "aud", "ttl"}},
			"template":  {attrs: []string{"data", "destination", "change_mode", "change_signal", "env", "perms", "source"}},
		}}
	port    = &stanza{labels: []string{"label"}, attrs: []string{"static", "to", "host_network"}}
	network = &stanza{attrs: []string{"mode", "hostname"}, blocks: map[string]*stanza{"port": port}}
	group   = &stanza{labels: []string{"name"}, attrs: []string{"count", "shutdown_delay"},
		blocks: map[string]*stanza{"network": network, "service": service, "task": task, "meta": freeform}}
	job = &stanza{labels: []string{"name"}, attrs: []string{"datacenters", "type", "region", "namespace", "priority", "node_pool"},
		blocks: map[string]*stanza{"group": group, "meta": freeform}}
	file = &stanza{blocks: map[string]*stanza{"job": job}}
)

// walk checks body against s and returns every problem found.
func walk(body hcl.Body, s *stanza, visit func(path string, b *hcl.Block)) hcl.Diagnostics {
	if s.freeform {
		return nil
	}
	content, diags := body.Content(s.schema())
	for _, b := range content.Blocks {
		if visit != nil {
			visit(b.Type, b)
		}
		diags = append(diags, walk(b.Body, s.blocks[b.Type], visit)...)
	}
	return diags
}

func TestJobFilesAreValidNomadJobs(t *testing.T) {
	files, _ := filepath.Glob("*.nomad.hcl")
	if len(files) < 3 {
		t.Fatalf("found %d job files, want the mesh, prestart and spoa jobs", len(files))
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			parsed, diags := hclparse.NewParser().ParseHCL(src, f)
			if diags.HasErrors() {
				t.Fatalf("not valid HCL: %s", diags.Error())
			}
			sidecars := 0
			diags = walk(parsed.Body, file, func(kind string, b *hcl.Block) {
				if kind == "task" && !strings.HasPrefix(literal(t, b.Body, "kind"), "connect-proxy:") || kind != "task" && kind != "sidecar_task" {
					return
				}
				sidecars++
				content, _, _ := b.Body.PartialContent(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{{Type: "config"}}})
				if len(content.Blocks) != 1 {
					t.Fatalf("%s: sidecar without a config block", b.DefRange)
				}
				cfg := content.Blocks[0].Body
				if img := literal(t, cfg, "image"); !strings.HasPrefix(img, "haconnect/haconnect:") {
					t.Errorf("%s: sidecar image %q, want haconnect/haconnect", b.DefRange, img)
				}
				if args := literalList(t, cfg, "args"); len(args) == 0 || args[0] != "nomad-hook" {
					t.Errorf("%s: sidecar args %q, want nomad-hook first", b.DefRange, args)
				}
			})
			if diags.HasErrors() {
				t.Fatalf("not a valid Nomad job: %s", diags.Error())
			}
			if strings.Contains(f, "mesh") && sidecars == 0 {
				t.Fatal("a mesh job without a haconnect sidecar task")
			}
		})
	}
}

// literal reads a string attribute that needs no variables ("" if absent).
func literal(t *testing.T, body hcl.Body, name string) string {
	t.Helper()
	content, _, _ := body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: name}}})
	attr := content.Attributes[name]
	if attr == nil {
		return ""
	}
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() || v.Type() != cty.String {
		t.Fatalf("%s: %s is not a literal string", attr.Range, name)
	}
	return v.AsString()
}

func literalList(t *testing.T, body hcl.Body, name string) []string {
	t.Helper()
	content, _, _ := body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: name}}})
	attr := content.Attributes[name]
	if attr == nil {
		return nil
	}
	v, diags := attr.Expr.Value(nil)
	if diags.HasErrors() || !v.CanIterateElements() {
		t.Fatalf("%s: %s is not a literal list", attr.Range, name)
	}
	var out []string
	for it := v.ElementIterator(); it.Next(); {
		_, e := it.Element()
		out = append(out, e.AsString())
	}
	return out
}

// TestSchemaCatchesMistakes makes sure the check can fail.
func TestSchemaCatchesMistakes(t *testing.T) {
	for _, src := range []string{
		"job \"x\" {\n group \"g\" {\n servce {\n name = \"a\"\n }\n }\n}\n",
		"job \"x\" {\n group \"g\" {\n service {\n connect {\n sidecar_task {\n lifecycle {\n hook = \"prestart\"\n }\n }\n }\n }\n }\n}\n",
		"job \"x\" {\n group \"g\" {\n task \"t\" {\n driver = \"docker\"\n cpu = 100\n }\n }\n}\n",
	} {
		parsed, diags := hclparse.NewParser().ParseHCL([]byte(src), "bad.hcl")
		if diags.HasErrors() {
			t.Fatal(diags)
		}
		if d := walk(parsed.Body, file, nil); !d.HasErrors() {
			t.Errorf("accepted: %s", src)
		}
	}
}
