#!/usr/bin/env bash
# Installs what haconnect's tests and demo need on a Debian machine,
# idempotently: Debian's haproxy (2.6 on bookworm), wrk and h2load (the
# benchmarks' generators) and a real consul built
# from the Go module proxy (cached under .tools/).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

if ! command -v haproxy >/dev/null 2>&1 && [[ ! -x /usr/sbin/haproxy ]]; then
	echo "tools: installing haproxy from Debian"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends haproxy >/dev/null
	# The package starts a system haproxy; haconnect runs its own.
	$SUDO systemctl disable --now haproxy >/dev/null 2>&1 || $SUDO service haproxy stop >/dev/null 2>&1 || true
fi
# The load generators of `make bench-mesh`: wrk for plain HTTP/1.1 entry
# points, h2load (nghttp2-client) for gRPC; valgrind (callgrind) counts the
# per-feature variants' instructions.
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v callgrind_control >/dev/null 2>&1 || missing+=(valgrind)
if [[ ${#missing[@]} -gt 0 ]]; then
	echo "tools: installing ${missing[*]} from Debian"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# perf (linux-perf) only adds bench-mesh's CPU breakdown: without it, or on
# a kernel that refuses it, the report says so.
if ! command -v perf >/dev/null 2>&1; then
	echo "tools: installing linux-perf from Debian (optional)"
	{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends linux-perf; } >/dev/null 2>&1 ||
		echo "tools: linux-perf not installed: bench-mesh will have no CPU breakdown"
fi
echo "tools: $(wrk --version 2>&1 | sed -n 1p)"
echo "tools: $(h2load --version 2>&1 | sed -n 1p)"
HAPROXY_BIN=/usr/sbin/haproxy
[[ -x $HAPROXY_BIN ]] || HAPROXY_BIN="$(command -v haproxy)"
# sed reads all its input (unlike head), so haproxy never dies of SIGPIPE.
echo "tools: $("$HAPROXY_BIN" -v | sed -n 1p)"

bash "$ROOT/scripts/install-consul.sh"
