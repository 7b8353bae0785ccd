// Package e2e holds haconnect's end-to-end tests: real Consul, real HAProxy,
// haconnect's real binaries, talking over loopback.
package e2e
