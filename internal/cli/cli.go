// Package cli holds what haconnect's commands share about their command
// line: flag parsing with the usual exit codes, and reporting a failure.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
)

// Parse parses flags; done reports that the command must exit with code:
// 0 after -help, 2 for a bad flag or an argument no flag takes.
func Parse(fs *flag.FlagSet, args []string, stderr io.Writer) (code int, done bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, true
		}
		return 2, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2, true
	}
	return 0, false
}

// Fail prints err, prefixed with the command's name, and returns exit code 1.
func Fail(stderr io.Writer, name string, err error) int {
	fmt.Fprintf(stderr, "%s: %v\n", name, err)
	return 1
}
