# One shared authorization agent per client node, for HAProxies on the same
# host that are not run by nomad-hook (nomad-hook's sidecars run their own
# agent inside the hook, on a unix socket in their working directory).
#
# Whoever can connect to the agent can ask for decisions, and whoever
# listens in its place while it is down answers for it. So it listens on a
# unix socket in a host directory that only root and the haproxy group can
# reach (create it once: install -d -m 0750 -g haproxy /run/haconnect), mode
# 0660, group haproxy (by gid: the client's meta haconnect_haproxy_gid, from
# `getent group haproxy`): HAProxy connects with
#   server spoa unix@/run/haconnect/spoa.sock
# and no other process on the node (nor anything on the network) can.
#
# HAProxies on other hosts: TCP with mutual TLS instead (replace the -listen
# argument with the commented block below, and give HAProxy
# `server spoa <node>:12345 ssl crt <its cert> ca-file <agent's CA> verify required`).
job "haconnect-spoa" {
  datacenters = ["dc1"]
  type        = "system"

  group "spoa" {
    network {
      port "metrics" {
        static = 9102
      }
    }

    task "spoa" {
      driver = "docker"

      config {
        image        = "haconnect/spoa:latest"
        network_mode = "host"
        entrypoint   = ["/haconnect-spoa"]
        args = [
          "-listen", "unix:/run/haconnect/spoa.sock",
          "-listen-mode", "0660",
          # The haproxy group's gid on the node (the image has no group
          # names): set the client's meta haconnect_haproxy_gid.
          "-listen-group", "${meta.haconnect_haproxy_gid}",
          # Over TCP with mutual TLS (certificates from your own CA, not
          # Consul's: a mesh certificate must not make its holder an
          # authorizer):
          #   "-listen", "${NOMAD_IP_metrics}:12345",
          #   "-tls-cert", "/secrets/spoa.pem",
          #   "-tls-key", "/secrets/spoa.key",
          #   "-tls-client-ca", "/secrets/haproxy-ca.pem",
          "-metrics-listen", "${NOMAD_IP_metrics}:9102",
          "-consul-addr", "http://${attr.unique.network.ip-address}:8500",
        ]
        mount {
          type   = "bind"
          source = "/run/haconnect"
          target = "/run/haconnect"
        }
      }

      resources {
        cpu = 200
        # Worst case with the default bounds (-max-conns 128,
        # -max-in-flight 256, -max-frame-size 16380): about 25 MiB of
        # buffers and goroutines, plus the decision cache; see the README.
        memory = 64
      }

      service {
        name     = "haconnect-spoa"
        port     = "metrics"
        provider = "consul"

        check {
          type     = "http"
          path     = "/metrics"
          interval = "10s"
          timeout  = "2s"
        }
      }
    }
  }
}
