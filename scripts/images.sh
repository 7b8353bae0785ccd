#!/usr/bin/env bash
# Builds haconnect's images without any registry:
#   haconnect/haproxy   from the offline Debian base (scripts/debian-base.sh)
#   haconnect/haconnect, haconnect/spoa, haconnect/demo-app  FROM scratch with static binaries
#   haconnect/sidecar   haconnect + HAProxy in one container (exec launcher)
#   haconnect/consul    the consul binary from scripts/install-consul.sh
# TAG (default: latest) tags all three. VERSION (default: the commit's tag,
# or "dev") is what `haconnect version` prints and every image's
# org.opencontainers.image.version label. With registry access, pass
# HAPROXY_BASE=debian:bookworm-slim to build on the public image instead.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TAG="${TAG:-latest}"
VERSION="${VERSION:-$(git describe --tags --dirty 2>/dev/null || echo dev)}"
REVISION="${REVISION:-$(git rev-parse HEAD 2>/dev/null || true)}"
HAPROXY_BASE="${HAPROXY_BASE:-haconnect/debian-haproxy:bookworm}"

if [[ "$HAPROXY_BASE" == haconnect/debian-haproxy:* ]]; then
	bash scripts/debian-base.sh "$HAPROXY_BASE"
fi
mkdir -p bin/static
pkg=github.com/haconnect/haconnect/internal/version
CGO_ENABLED=0 go build -trimpath -ldflags "-X $pkg.Version=$VERSION -X $pkg.Revision=$REVISION" \
	-o bin/static/ ./cmd/haconnect ./cmd/haconnect-spoa ./cmd/haconnect-demo-app
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" # the classic builder needs no extra images
build() { # tag dockerfile [build-arg]: quiet unless it fails
	local log
	log="$(mktemp)"
	if ! docker build -q -t "$1" --build-arg "VERSION=$VERSION" ${3:+--build-arg "$3"} -f "$2" . >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		exit 1
	fi
	rm -f "$log"
}
build "haconnect/haproxy:$TAG" images/haproxy/Dockerfile "BASE=$HAPROXY_BASE"
build "haconnect/haconnect:$TAG" images/haconnect/Dockerfile
build "haconnect/spoa:$TAG" images/spoa/Dockerfile
build "haconnect/demo-app:$TAG" images/demo-app/Dockerfile
build "haconnect/sidecar:$TAG" images/sidecar/Dockerfile "BASE=haconnect/haproxy:$TAG"
# Consul for the compose mesh, from the binary `make tools` builds.
bash scripts/install-consul.sh >/dev/null
build "haconnect/consul:$TAG" images/consul/Dockerfile "BASE=$HAPROXY_BASE"
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep "^haconnect/.*:$TAG "
