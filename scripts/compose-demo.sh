#!/usr/bin/env bash
# The local mesh demo in containers (docker-compose.yml): builds the images
# offline, brings the mesh up, calls dashboard -> counting, flips the
# intention to deny and back, shows the metrics, and tears everything down
# (DEMO_KEEP=1 leaves it running).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
CONSUL="http://127.0.0.1:${HACONNECT_CONSUL_PORT:-18500}"
DASHBOARD="http://127.0.0.1:${HACONNECT_DASHBOARD_PORT:-9002}/"
METRICS="http://127.0.0.1:${HACONNECT_COUNTING_ADMIN_PORT:-19101}/metrics"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
down() { "${COMPOSE[@]}" -p haconnect-demo down -v --remove-orphans -t 5 >/dev/null 2>&1 || true; }
intention() { # allow|deny
	curl -sf -X PUT "$CONSUL/v1/config" -d "{\"Kind\":\"service-intentions\",\"Name\":\"counting\",\"Sources\":[{\"Name\":\"dashboard\",\"Action\":\"$1\"},{\"Name\":\"*\",\"Action\":\"deny\"}]}" >/dev/null
}
call() { curl -s -w '[HTTP %{http_code}]\n' "$DASHBOARD" || true; }

step "Images (offline: debootstrap base, FROM scratch)"
bash scripts/images.sh
if [[ "${DEMO_KEEP:-}" != 1 ]]; then trap down EXIT; fi
step "docker compose up: consul, counting + sidecar, dashboard + sidecar"
"${COMPOSE[@]}" -p haconnect-demo up -d
for _ in $(seq 180); do
	curl -sf "$DASHBOARD" >/dev/null 2>&1 && break
	sleep 0.5
done

step "dashboard calls counting through both sidecars (mTLS + intentions): $DASHBOARD"
call
step "Intention dashboard -> counting: deny"
intention deny
sleep 1
call
step "Back to allow"
intention allow
sleep 1
call
step "counting's sidecar metrics ($METRICS)"
curl -s "$METRICS" | grep -E '^haconnect_(requests_total|denied_total|request_duration_seconds_count)'

if [[ "${DEMO_KEEP:-}" == 1 ]]; then
	step "Running. Consul UI: $CONSUL/ui  Stop: ${COMPOSE[*]} -p haconnect-demo down -v"
else
	step "Tearing down"
fi
