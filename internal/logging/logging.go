// Package logging builds the go-hclog logger every haconnect command uses.
package logging

import (
	"flag"
	"fmt"
	"io"

	"github.com/hashicorp/go-hclog"
)

// Flags holds -log-level and -log-json.
type Flags struct {
	Level string
	JSON  bool
}

// Register adds the flags to fs.
func (f *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&f.Level, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.BoolVar(&f.JSON, "log-json", false, "log JSON lines instead of text")
}

// New returns a logger named name that writes to w.
func (f *Flags) New(name string, w io.Writer) (hclog.Logger, error) {
	level := hclog.LevelFromString(f.Level)
	if level == hclog.NoLevel {
		return nil, fmt.Errorf("-log-level %q: want trace, debug, info, warn or error", f.Level)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      level,
		Output:     w,
		JSONFormat: f.JSON,
	}), nil
}
