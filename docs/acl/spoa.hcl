# ACL policy for haconnect-spoa (or `haconnect spoa`) deciding for the
# destination service "api". Give one such block per destination: -target
# and every `target` HAProxy sends.
#
# service:write on the destination: /v1/agent/connect/authorize, the only
# place Consul reports the default policy for callers no intention matches.
# It includes what the SPOA also reads about the destination:
# intention:read (/v1/connect/intentions/match) and service:read
# (/v1/discovery-chain/api). The CA roots need no permission.
service "api" {
  policy = "write"
}
