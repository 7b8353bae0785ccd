# ACL policy for `haconnect sidecar` (and `haconnect nomad-hook`) serving the
# service "web", whose proxy is registered as "web-sidecar-proxy", with one
# upstream "api". Rename to your services; a proxy registered under another
# name needs that name in the second block.

# The leaf certificate (/v1/agent/connect/ca/leaf/web), and the embedded SPOA
# deciding for callers of web, as in spoa.hcl.
service "web" {
  policy = "write"
}

# The proxy registration: /v1/agent/service/<proxy-id>, and the agent's
# service list that -sidecar-for searches.
service "web-sidecar-proxy" {
  policy = "read"
}

# Each upstream: its healthy instances, /v1/health/connect/api. Without the
# first block Consul refuses the call; without the other two it leaves out
# the instances (their proxies' service and their nodes), which the sidecar
# reports as an error. The same "api" block lets the sidecar read api's
# discovery chain (/v1/discovery-chain/api); a chain whose targets are other
# services (a redirect, a failover to "api-backup") needs these two service
# blocks for each of them too, or their instances cannot be read.
service "api" {
  policy = "read"
}

service "api-sidecar-proxy" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}
