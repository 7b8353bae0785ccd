// Command haconnect-spoa is the authorization agent (SPOA) on its own, for
// an HAProxy that haconnect does not manage. See the README, "SPOA
// standalone for an existing HAProxy".
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/haconnect/haconnect/internal/spoacmd"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(spoacmd.Run(ctx, os.Args[1:], os.Stderr))
}
