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
	// attrsOnly: a map of attributes, nested blocks refused (what Nomad's
	// jobspec decoder does for map[string]any blocks such as a proxy's or
	// an upstream's config: hcl's JustAttributes, jobspec2/parse_map.go).
	attrsOnly bool
}

var (
	freeform  = &stanza{freeform: true}
	attrsOnly = &stanza{attrsOnly: true}
)

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
	// Nomad's api.ConsulUpstream, api.ConsulProxy, api.ConsulExposeConfig
	// and api.ConsulExposePath hcl tags: config is a block of attributes.
	upstreams = &stanza{attrs: []string{"destination_name", "destination_namespace", "destination_peer", "destination_partition",
		"destination_type", "local_bind_port", "local_bind_address", "local_bind_socket_path", "local_bind_socket_mode", "datacenter"},
		blocks: map[string]*stanza{"config": attrsOnly, "mesh_gateway": {attrs: []string{"mode"}}}}
	expose = &stanza{blocks: map[string]*stanza{"path": {attrs: []string{"path", "protocol", "local_path_port", "listener_port"}}}}
	proxy  = &stanza{attrs: []string{"local_service_address", "local_service_port"},
		blocks: map[string]*stanza{"upstreams": upstreams, "config": attrsOnly, "expose": expose}}
	// api.WorkloadIdentity's hcl tags.
	identity = &stanza{attrs: []string{"name", "aud", "change_mode", "change_signal", "env", "file", "filepath", "service_name", "ttl", "extra_claims"}}
	// api.SidecarTask's hcl tags: identity yes, lifecycle no.
	sidecarTask = &stanza{attrs: []string{"name", "driver", "user", "kill_timeout", "shutdown_delay", "kill_signal"},
		blocks: map[string]*stanza{"config": freeform, "env": freeform, "meta": freeform, "resources": resources,
			"logs": {attrs: []string{"max_files", "max_file_size"}}, "identity": identity, "volume_mount": freeform}}
	connect = &stanza{attrs: []string{"native"}, blocks: map[string]*stanza{
		"sidecar_service": {attrs: []string{"port", "tags", "disable_default_tcp_check"}, blocks: map[string]*stanza{"proxy": proxy, "meta": freeform}},
		"sidecar_task":    sidecarTask,
	}}
	service = &stanza{attrs: []string{"name", "port", "tags", "provider", "address_mode", "task"},
		blocks: map[string]*stanza{"connect": connect, "check": check, "meta": freeform}}
	task = &stanza{labels: []string{"name"}, attrs: []string{"driver", "kind", "user", "kill_timeout", "kill_signal", "shutdown_delay", "leader"},
		blocks: map[string]*stanza{
			"config": freeform, "env": freeform, "meta": freeform, "resources": resources, "service": service,
			"lifecycle": {attrs: []string{"hook", "sidecar"}},
			"identity":  identity,
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
	if s.attrsOnly {
		_, diags := body.JustAttributes()
		return diags
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
		// Nomad decodes an upstream's config as attributes only: limits
		// must be written `limits = { ... }`.
		"job \"x\" {\n group \"g\" {\n service {\n connect {\n sidecar_service {\n proxy {\n upstreams {\n config {\n limits {\n max_connections = 1\n }\n }\n }\n }\n }\n }\n }\n }\n}\n",
		"job \"x\" {\n group \"g\" {\n service {\n connect {\n sidecar_service {\n proxy {\n expose {\n path {\n port = 1\n }\n }\n }\n }\n }\n }\n }\n}\n",
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

// blocksAt returns the blocks reached from body by the block types in path
// (labels ignored).
func blocksAt(t *testing.T, body hcl.Body, path ...string) []*hcl.Block {
	t.Helper()
	content, _, _ := body.PartialContent(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{{Type: path[0], LabelNames: labelsOf(path[0])}}})
	if len(path) == 1 {
		return content.Blocks
	}
	var out []*hcl.Block
	for _, b := range content.Blocks {
		out = append(out, blocksAt(t, b.Body, path[1:]...)...)
	}
	return out
}

func labelsOf(blockType string) []string {
	switch blockType {
	case "job", "group", "task":
		return []string{"name"}
	case "port":
		return []string{"label"}
	}
	return nil
}

func parseJob(t *testing.T, f string) hcl.Body {
	t.Helper()
	src, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	parsed, diags := hclparse.NewParser().ParseHCL(src, f)
	if diags.HasErrors() {
		t.Fatal(diags)
	}
	return parsed.Body
}

// attrValue evaluates an attribute that needs no variables (cty.NilVal if
// absent).
func attrValue(t *testing.T, body hcl.Body, name string) cty.Value {
	t.Helper()
	attrs, _ := body.JustAttributes()
	if attrs == nil {
		content, _, _ := body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: name}}})
		attrs = content.Attributes
	}
	a := attrs[name]
	if a == nil {
		return cty.NilVal
	}
	v, diags := a.Expr.Value(nil)
	if diags.HasErrors() {
		t.Fatalf("%s: %s", a.Range, diags.Error())
	}
	return v
}

// TestSidecarsCanUseTheTaskAPI: Nomad's task API socket answers only
// requests that carry a token, even with ACLs off
// (client/allocrunner/taskrunner/api_hook.go; command/agent/http.go,
// authMiddleware: 401 without a token, 403 unless it is an ACL token or a
// workload identity). A sidecar that points NOMAD_ADDR at it must expose
// its workload identity: identity { env = true } gives NOMAD_TOKEN, in a
// task or in sidecar_task (api.SidecarTask.Identities, merged by
// nomad/structs/services.go SidecarTask.MergeIntoTask; an unnamed identity
// becomes the task's default one in Task.Canonicalize, which
// job_endpoint_hook_connect.go runs after the merge).
func TestSidecarsCanUseTheTaskAPI(t *testing.T) {
	files, _ := filepath.Glob("*.nomad.hcl")
	checked := 0
	for _, f := range files {
		body := parseJob(t, f)
		src, _ := os.ReadFile(f)
		sidecars := blocksAt(t, body, "job", "group", "service", "connect", "sidecar_task")
		sidecars = append(sidecars, blocksAt(t, body, "job", "group", "task")...)
		for _, b := range sidecars {
			var addr string
			for _, env := range blocksAt(t, b.Body, "env") {
				// The value interpolates NOMAD_SECRETS_DIR: read its source.
				if attrs, _ := env.Body.JustAttributes(); attrs["NOMAD_ADDR"] != nil {
					addr = string(attrs["NOMAD_ADDR"].Expr.Range().SliceBytes(src))
				}
			}
			if !strings.Contains(addr, "api.sock") {
				continue
			}
			checked++
			ok := false
			for _, id := range blocksAt(t, b.Body, "identity") {
				if name := attrValue(t, id.Body, "name"); name != cty.NilVal && name.AsString() != "default" {
					continue
				}
				if v := attrValue(t, id.Body, "env"); v != cty.NilVal && v.True() {
					ok = true
				}
			}
			if !ok {
				t.Errorf("%s: %s uses the task API (%s) without identity { env = true }: it would get 401", f, b.DefRange, addr)
			}
		}
	}
	if checked < 4 {
		t.Fatalf("checked %d sidecars using the task API, want those of every mesh job", checked)
	}
}

// TestExposeJob: mesh-expose.nomad.hcl has what its comment promises, in
// the shapes Nomad accepts.
func TestExposeJob(t *testing.T) {
	body := parseJob(t, "mesh-expose.nomad.hcl")
	exposedCheck := false
	for _, c := range blocksAt(t, body, "job", "group", "service", "check") {
		if v := attrValue(t, c.Body, "expose"); v != cty.NilVal && v.True() {
			exposedCheck = true
			if attrValue(t, c.Body, "type").AsString() != "http" || !strings.HasPrefix(attrValue(t, c.Body, "path").AsString(), "/") {
				t.Errorf("%s: an exposed check must be http (no gRPC here) with a path", c.DefRange)
			}
		}
	}
	if !exposedCheck {
		t.Error("no check with expose = true")
	}
	// Each expose path's listener_port is a port of its group's network
	// with to = -1 (the same number inside the namespace as on the host).
	paths := 0
	for _, g := range blocksAt(t, body, "job", "group") {
		ports := map[string]cty.Value{}
		for _, p := range blocksAt(t, g.Body, "network", "port") {
			ports[p.Labels[0]] = attrValue(t, p.Body, "to")
		}
		for _, p := range blocksAt(t, g.Body, "service", "connect", "sidecar_service", "proxy", "expose", "path") {
			paths++
			label := attrValue(t, p.Body, "listener_port").AsString()
			to, ok := ports[label]
			if !ok || to == cty.NilVal || !to.RawEquals(cty.NumberIntVal(-1)) {
				t.Errorf("%s: listener_port %q is not a network port with to = -1", p.DefRange, label)
			}
			if proto := attrValue(t, p.Body, "protocol"); proto != cty.NilVal && proto.AsString() != "http" {
				t.Errorf("%s: protocol %q (no gRPC here)", p.DefRange, proto.AsString())
			}
		}
	}
	if paths == 0 {
		t.Error("no expose { path {...} }")
	}
	metrics := false
	for _, c := range blocksAt(t, body, "job", "group", "service", "connect", "sidecar_service", "proxy", "config") {
		if v := attrValue(t, c.Body, "envoy_prometheus_bind_addr"); v != cty.NilVal && v.AsString() != "" {
			metrics = true
		}
	}
	if !metrics {
		t.Error("no envoy_prometheus_bind_addr in a proxy config")
	}
	limits := false
	for _, c := range blocksAt(t, body, "job", "group", "service", "connect", "sidecar_service", "proxy", "upstreams", "config") {
		v := attrValue(t, c.Body, "limits")
		if v == cty.NilVal {
			continue
		}
		limits = true
		if !v.Type().IsObjectType() {
			t.Fatalf("limits is %s, want an object", v.Type().FriendlyName())
		}
		for _, k := range []string{"max_connections", "max_pending_requests", "max_concurrent_requests"} {
			if !v.Type().HasAttribute(k) {
				t.Errorf("limits without %s", k)
			}
		}
	}
	if !limits {
		t.Error("no upstream config limits")
	}
}
