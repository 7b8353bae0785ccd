package sidecar

import (
	"os"
	"strings"
	"testing"
)

const (
	tableStart = "<!-- settings table: generated from plugin/sidecar/settings.go and settings_table.go -->\n"
	tableEnd   = "<!-- end of settings table -->"
)

// TestREADMESettingsTable keeps the README's table of every proxy setting
// equal to the lists the sidecar follows. HACONNECT_UPDATE_README=1
// rewrites it.
func TestREADMESettingsTable(t *testing.T) {
	const path = "../../README.md"
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	i, j := strings.Index(readme, tableStart), strings.Index(readme, tableEnd)
	if i < 0 || j < i {
		t.Fatalf("README.md has no settings table between %q and %q", tableStart, tableEnd)
	}
	want := SettingsTable()
	if got := readme[i+len(tableStart) : j]; got != want {
		if os.Getenv("HACONNECT_UPDATE_README") == "1" {
			if err := os.WriteFile(path, []byte(readme[:i+len(tableStart)]+want+readme[j:]), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		t.Fatalf("README.md's settings table is out of date: run HACONNECT_UPDATE_README=1 go test ./plugin/sidecar -run TestREADMESettingsTable\nwant:\n%s", want)
	}
}
