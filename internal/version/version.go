// Package version tells which haconnect this is: the release, the commit it
// was built from, and what it was built for, as `consul version` does.
package version

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// Version is the release, set at build time by the Makefile:
//
//	go build -ldflags "-X github.com/haconnect/haconnect/internal/version.Version=v1.2.3"
//
// A plain `go build` leaves "dev".
var Version = "dev"

// Revision is the commit when Go embeds none (builds with -buildvcs=false,
// or from a tree without git): the Makefile sets it the same way.
var Revision = ""

// HAProxy is the HAProxy release the rendered configurations, the SPOE
// messages and the Lua are written for.
const HAProxy = "2.6"

// consulAPIModule is the Consul client library whose version is reported:
// the agent HTTP API haconnect speaks is the one this module knows.
const consulAPIModule = "github.com/hashicorp/consul/api"

// Info is what Print reports.
type Info struct {
	Version   string
	Revision  string // the commit, "unknown" when built outside a checkout
	Modified  bool   // the checkout had uncommitted changes
	ConsulAPI string // the version of consulAPIModule, "unknown" if absent
	Go        string
}

// Get reads the build information Go embeds in the binary.
func Get() Info {
	i := Info{Version: Version, Revision: orString(Revision, "unknown"), ConsulAPI: "unknown", Go: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return i
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			i.Revision = s.Value
		case "vcs.modified":
			i.Modified = s.Value == "true"
		}
	}
	for _, d := range bi.Deps {
		if d.Path == consulAPIModule {
			if d.Replace != nil {
				d = d.Replace
			}
			i.ConsulAPI = d.Version
		}
	}
	return i
}

// Print writes name's version lines to w.
func Print(w io.Writer, name string) {
	i := Get()
	rev := i.Revision
	if i.Modified {
		rev += " (modified)"
	}
	fmt.Fprintf(w, "%s %s\nRevision %s\nHAProxy %s\nConsul API %s (%s)\nGo %s\n",
		name, i.Version, rev, HAProxy, i.ConsulAPI, consulAPIModule, i.Go)
}

func orString(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
