// Command haconnect runs haconnect's data-plane components:
//
//	haconnect sidecar -sidecar-for <service-id>   a Connect sidecar (HAProxy + SPOA)
//	haconnect spoa ...                            the authorization agent alone
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/haconnect/haconnect/internal/nomadcmd"
	"github.com/haconnect/haconnect/internal/sidecarcmd"
	"github.com/haconnect/haconnect/internal/spoacmd"
	"github.com/haconnect/haconnect/internal/version"
)

const usage = `usage: haconnect <command> [flags]

commands:
  sidecar      run a Connect sidecar: HAProxy configured from Consul, with the SPOA
  nomad-hook   run the sidecar of the Nomad allocation this task belongs to,
               HAProxy in a container in the allocation's network namespace
  gc           remove HAProxy containers whose Nomad allocation is gone
  spoa         run the authorization agent alone (same as haconnect-spoa)
  version      print the version, the commit and what it was built for (also -version)

"haconnect <command> -h" lists a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stderr))
}

func run(ctx context.Context, args []string, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "sidecar":
		return sidecarcmd.Run(ctx, args[1:], stderr)
	case "spoa":
		return spoacmd.Run(ctx, args[1:], stderr)
	case "nomad-hook":
		return nomadcmd.RunHook(ctx, args[1:], stderr)
	case "gc":
		return nomadcmd.RunGC(ctx, args[1:], os.Stdout, stderr)
	case "version", "-version", "--version":
		if len(args) > 1 {
			fmt.Fprintf(stderr, "haconnect version: unexpected argument %q\n", args[1])
			return 2
		}
		version.Print(os.Stdout, "haconnect")
		return 0
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stderr, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "haconnect: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
