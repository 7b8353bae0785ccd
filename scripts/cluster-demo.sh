#!/usr/bin/env bash
# The mesh on a real Consul cluster in containers (docker-compose.cluster.yml):
# three servers, three nodes (web, api-1, api-2) each with its own agent and
# sidecar. Builds the images offline, brings the cluster up, calls web -> api
# (both instances), stops the Raft leader and shows traffic still flowing,
# and tears everything down (DEMO_KEEP=1 leaves it running).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
COMPOSE+=(-p haconnect-cluster -f docker-compose.cluster.yml)
CONSUL="http://127.0.0.1:${HACONNECT_CLUSTER_CONSUL_PORT:-18510}"
WEB="http://127.0.0.1:${HACONNECT_CLUSTER_WEB_PORT:-9003}/"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
down() { "${COMPOSE[@]}" down -v --remove-orphans -t 3 >/dev/null 2>&1 || true; }
call() { curl -s -w '[HTTP %{http_code}]\n' "$WEB" || true; }

step "Images (offline: debootstrap base, FROM scratch)"
bash scripts/images.sh
if [[ "${DEMO_KEEP:-}" != 1 ]]; then trap down EXIT; fi
step "docker compose up: 3 Consul servers, nodes web, api-1, api-2 (agent + app + sidecar each)"
"${COMPOSE[@]}" up -d
seen=""
for _ in $(seq 240); do # until web has reached both api instances
	seen+="$(curl -sf "$WEB" 2>/dev/null | grep -o 'hello from api-[12]' || true)"
	[[ "$seen" == *api-1* && "$seen" == *api-2* ]] && break
	sleep 0.5
done
step "Members as web's agent sees them"
"${COMPOSE[@]}" exec -T web-agent consul members
step "web calls api through the mesh (both instances, round robin): $WEB"
for _ in 1 2 3 4; do call; done
leader="$(curl -s "$CONSUL/v1/status/leader" | tr -d '"' | cut -d: -f1)"
server="consul-server-$(( ${leader##*.} - 10 ))"
step "Stopping the Raft leader ($leader, $server): traffic keeps flowing"
"${COMPOSE[@]}" stop -t 5 "$server" >/dev/null
for _ in 1 2 3 4; do call; done
for _ in $(seq 60); do
	l="$("${COMPOSE[@]}" exec -T web-agent consul operator raft list-peers 2>/dev/null | awk '/leader/{print $1}')" && [[ -n "$l" ]] && break
	sleep 0.5
done
echo "new leader: ${l:-none yet}"
"${COMPOSE[@]}" start "$server" >/dev/null

if [[ "${DEMO_KEEP:-}" == 1 ]]; then
	step "Running. Consul UI: $CONSUL/ui  Stop: ${COMPOSE[*]} down -v"
else
	step "Tearing down"
fi
