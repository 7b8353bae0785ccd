// Package lua holds the HAProxy Lua that haconnect's rendered
// configurations load, embedded so that the binary carries it.
package lua

import _ "embed"

// Telemetry is haconnect.lua: the /metrics service of the admin listener.
//
//go:embed haconnect.lua
var Telemetry []byte
