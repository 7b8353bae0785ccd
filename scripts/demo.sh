#!/usr/bin/env bash
# Local demo of the SPOA in front of an app: a Consul dev agent, Debian's
# HAProxy with the documented standalone config, haconnect-spoa, and a small
# app. It calls the app as an allowed and a denied service, flips the
# intention, shows the metrics, and cleans up (DEMO_KEEP=1 keeps it running).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CONSUL="${HACONNECT_CONSUL:-$ROOT/.tools/consul-1.16.3/consul}"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"
DIR="$(mktemp -d /tmp/haconnect-demo.XXXXXX)"
HTTP_PORT=18500 INBOUND=21000 APP=18080 METRICS=19100
export CONSUL_HTTP_ADDR="127.0.0.1:$HTTP_PORT"
PIDS=()

cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
wait_sock() { for _ in $(seq 100); do [[ -S "$1" ]] && return 0; sleep 0.1; done; echo "socket $1 never appeared" >&2; exit 1; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
consul_api() { curl -sf "http://$CONSUL_HTTP_ADDR$1" "${@:2}"; }

step "Consul dev agent on :$HTTP_PORT"
"$CONSUL" agent -dev -client 127.0.0.1 -bind 127.0.0.1 -log-level warn \
	-hcl "ports { http = $HTTP_PORT dns = -1 grpc = -1 grpc_tls = -1 serf_lan = 18301 serf_wan = 18302 server = 18300 }" \
	>"$DIR/consul.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do consul_api /v1/agent/connect/ca/roots >/dev/null 2>&1 && break; sleep 0.2; done

step "Certificates from Consul's Connect CA (api serves, web and batch call)"
for svc in api web batch; do
	consul_api "/v1/agent/connect/ca/leaf/$svc" | python3 -c '
import json, sys
leaf = json.load(sys.stdin)
open(sys.argv[1] + ".crt", "w").write(leaf["CertPEM"])
open(sys.argv[1] + ".key", "w").write(leaf["PrivateKeyPEM"])' "$DIR/$svc"
done
cat "$DIR/api.crt" "$DIR/api.key" >"$DIR/leaf.pem"
consul_api /v1/agent/connect/ca/roots | python3 -c '
import json, sys
print("".join(r["RootCert"].strip() + "\n" for r in json.load(sys.stdin)["Roots"]))' >"$DIR/roots.pem"
chmod 600 "$DIR"/*

step "Intentions: web -> api allow, * -> api deny"
consul_api /v1/config -X PUT -d '{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"allow"},{"Name":"*","Action":"deny"}]}' >/dev/null

step "The app, haconnect-spoa and HAProxy"
"$ROOT/bin/haconnect-demo-app" -listen "127.0.0.1:$APP" >"$DIR/app.log" 2>&1 &
PIDS+=($!)
"$ROOT/bin/haconnect-spoa" -listen "unix:$DIR/spoa.sock" -target api -metrics-listen "127.0.0.1:$METRICS" >"$DIR/spoa.log" 2>&1 &
PIDS+=($!)
sed -e "s#/etc/haproxy/haconnect#$DIR#g" -e "s#/run/haconnect/spoa.sock#$DIR/spoa.sock#" -e "s#127.0.0.1:8080#127.0.0.1:$APP#" "$ROOT/examples/standalone/haproxy.cfg" >"$DIR/haproxy.cfg"
sed -e "s#/etc/haproxy/haconnect#$DIR#g" "$ROOT/examples/standalone/spoe.conf" >"$DIR/spoe.conf"
sed -e "s#/etc/haproxy/haconnect#$DIR#g" "$ROOT/examples/standalone/spoe-tcp.conf" >"$DIR/spoe-tcp.conf"
"$HAPROXY" -c -q -f "$DIR/haproxy.cfg"
"$HAPROXY" -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 &
PIDS+=($!)
wait_port "$APP"; wait_sock "$DIR/spoa.sock"; wait_port "$INBOUND"

call() { # caller: one mTLS request to the app's sidecar
	# -k: mesh certificates name SPIFFE IDs, not hosts; the client certificate is what matters here.
	printf '%-6s -> api: ' "$1"
	curl -sk --cert "$DIR/$1.crt" --key "$DIR/$1.key" -w ' [HTTP %{http_code}]\n' "https://127.0.0.1:$INBOUND/" | tr -d '\n' ; echo
}

step "Calls through HAProxy (mTLS + SPOA authorization)"
call web
call batch
printf '%-6s -> api: ' "(none)"
if code=$(curl -sk "https://127.0.0.1:$INBOUND/" -o /dev/null -w '%{http_code}' 2>/dev/null); then echo "[HTTP $code]"; else echo "no client certificate: refused in the TLS handshake"; fi

step "Flip web -> api to deny"
consul_api /v1/config -X PUT -d '{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"deny"},{"Name":"*","Action":"deny"}]}' >/dev/null
call web
step "And back to allow"
consul_api /v1/config -X PUT -d '{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"allow"},{"Name":"*","Action":"deny"}]}' >/dev/null
call web

step "SPOA metrics (http://127.0.0.1:$METRICS/metrics)"
curl -s "http://127.0.0.1:$METRICS/metrics" | grep -E '^haconnect_spoa_(decisions_total|cache_lookups_total|consul_up)' | grep -v ' 0$'

if [[ "${DEMO_KEEP:-}" == 1 ]]; then
	step "Running; files in $DIR. Ctrl-C stops everything."
	wait
fi
step "Done; everything stopped."
