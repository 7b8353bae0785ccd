#!/usr/bin/env bash
# Builds a real Consul agent from the Go module proxy and caches it under
# .tools/consul-<version>/consul. Debian ships no Consul, and v1.16.3 is the
# newest MPL-licensed release the module proxy serves.
#
# Consul's go.mod uses replace directives for its own sub-modules, so
# `go install consul@v1.16.3` is refused. Instead we build it from a tiny
# wrapper module that requires consul and the sub-modules at the versions
# consul's go.mod names, with the same excludes. The checksum database lacks a
# few of consul's dependencies, so the wrapper's go.sum is seeded from the
# go.sum files that ship inside the consul module zips.
set -euo pipefail

VERSION="${CONSUL_VERSION:-1.16.3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/consul-$VERSION"
BIN="$DEST/consul"

# The version output is read whole, never piped into a reader that stops early
# (grep -q, head): under pipefail consul's SIGPIPE would fail the script.
installed_version() { "$BIN" version 2>/dev/null | sed -n 1p; }

if [[ -x "$BIN" ]] && [[ "$(installed_version)" == "Consul v$VERSION" ]]; then
	echo "consul v$VERSION: cached at $BIN"
	exit 0
fi

case "$VERSION" in
1.16.3) API=v1.25.1 SDK=v0.14.1 PROTO=v0.4.1 ENVOYEXT=v0.4.1 TROUBLE=v0.3.1 ;;
*) echo "install-consul: no sub-module versions recorded for consul $VERSION" >&2; exit 2 ;;
esac

WORK="$DEST/build"
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
cat >go.mod <<MOD
module haconnect.local/consulbuild

go 1.26

require (
	github.com/hashicorp/consul v$VERSION
	github.com/hashicorp/consul/api $API
	github.com/hashicorp/consul/sdk $SDK
	github.com/hashicorp/consul/proto-public $PROTO
	github.com/hashicorp/consul/envoyextensions $ENVOYEXT
	github.com/hashicorp/consul/troubleshoot $TROUBLE
)

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
MOD

# The checksum database has no entry for some consul sub-module tags (e.g.
# envoyextensions v0.4.1); they are still served by the module proxy.
export GONOSUMDB="github.com/hashicorp/consul${GONOSUMDB:+,$GONOSUMDB}"
export GOFLAGS=-mod=mod

modzip() { # module@version -> directory of the extracted module
	go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}
: >go.sum
for m in "github.com/hashicorp/consul@v$VERSION" \
	"github.com/hashicorp/consul/api@$API" \
	"github.com/hashicorp/consul/sdk@$SDK" \
	"github.com/hashicorp/consul/proto-public@$PROTO" \
	"github.com/hashicorp/consul/envoyextensions@$ENVOYEXT" \
	"github.com/hashicorp/consul/troubleshoot@$TROUBLE"; do
	dir="$(modzip "$m")"
	if [[ -f "$dir/go.sum" ]]; then cat "$dir/go.sum" >>go.sum; fi
done
sort -u go.sum -o go.sum

echo "install-consul: building consul v$VERSION (takes several minutes on a cold module cache)"
CGO_ENABLED=0 go build -trimpath -o "$BIN.tmp" github.com/hashicorp/consul
mv "$BIN.tmp" "$BIN"
cd "$ROOT"
rm -rf "$WORK"
installed_version
