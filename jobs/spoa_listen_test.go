package jobs_test

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
)

// TestSPOAJobIsNotOpenToTheNetwork: the shared agent listens on a unix
// socket with a tight mode, or on TCP with mutual TLS; never on a plain
// TCP port anyone on the network can reach.
func TestSPOAJobIsNotOpenToTheNetwork(t *testing.T) {
	src, err := os.ReadFile("spoa.nomad.hcl")
	if err != nil {
		t.Fatal(err)
	}
	parsed, diags := hclparse.NewParser().ParseHCL(src, "spoa.nomad.hcl")
	if diags.HasErrors() {
		t.Fatal(diags)
	}
	var args []string
	walk(parsed.Body, file, func(kind string, b *hcl.Block) {
		if kind != "task" {
			return
		}
		content, _, _ := b.Body.PartialContent(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{{Type: "config"}}})
		for _, cfg := range content.Blocks {
			args = append(args, literalListTemplates(t, cfg.Body, "args")...)
		}
	})
	i := slices.Index(args, "-listen")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("the agent's args %q set no -listen (its default is a unix socket, but say so)", args)
	}
	listen := args[i+1]
	switch {
	case strings.HasPrefix(listen, "unix:"):
		j := slices.Index(args, "-listen-mode")
		if j < 0 || (args[j+1] != "0600" && args[j+1] != "0660") {
			t.Errorf("unix socket without a tight -listen-mode: %q", args)
		}
	default:
		for _, f := range []string{"-tls-cert", "-tls-key", "-tls-client-ca"} {
			if !slices.Contains(args, f) {
				t.Errorf("TCP listener %s without %s: %q", listen, f, args)
			}
		}
	}
	if slices.Contains(args, "-insecure-listen") {
		t.Errorf("the job opens the agent to the network: %q", args)
	}
}

// literalListTemplates reads a list attribute whose items may hold ${...}
// interpolations, keeping the literal parts.
func literalListTemplates(t *testing.T, body hcl.Body, name string) []string {
	t.Helper()
	content, _, _ := body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: name}}})
	attr := content.Attributes[name]
	if attr == nil {
		return nil
	}
	var out []string
	for _, item := range attr.Expr.(interface{ ExprList() []hcl.Expression }).ExprList() {
		r := item.Range()
		out = append(out, strings.Trim(string(r.SliceBytes(mustRead(t, r.Filename))), `"`))
	}
	return out
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
