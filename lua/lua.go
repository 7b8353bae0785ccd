// Package lua holds the HAProxy Lua that haconnect's rendered
// configurations load, embedded so that the binary carries it.
package lua

import _ "embed"

// Telemetry is haconnect.lua: the /metrics service of the admin listener,
// and the parse of upstream certificates that checks an upstream's SPIFFE
// ID (lua.haconnect_peer_uri).
//
//go:embed haconnect.lua
var Telemetry []byte
