#!/usr/bin/env bash
# Installs what haconnect's tests and demo need on a Debian machine,
# idempotently: Debian's haproxy (2.6 on bookworm) and a real consul built
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
echo "tools: $(/usr/sbin/haproxy -v 2>/dev/null | head -1 || haproxy -v | head -1)"

bash "$ROOT/scripts/install-consul.sh"
