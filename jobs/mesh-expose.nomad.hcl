# mesh.nomad.hcl with what Envoy job files commonly add, unchanged apart from
# sidecar_task:
#   - `check { expose = true }`: Nomad turns the check into an expose path at
#     submission (a generated port label with to = -1) and registers it as
#     the sidecar's Proxy.Expose.Paths; the Consul agent calls the check on
#     that port, where haconnect serves the check's path, and only it, in
#     plain HTTP to the app;
#   - `expose { path {...} }`: the same by hand, here for a load balancer
#     outside the mesh that probes web's /healthz on the static port 9090;
#   - `envoy_prometheus_bind_addr`: haconnect serves its scrape target there
#     (haconnect's, the embedded SPOA's and HAProxy's metrics), registered
#     as the service api-sidecar-metrics for Prometheus' Consul discovery;
#   - upstream `limits`: a map in the upstream's `config` (Nomad's upstream
#     config is a map of attributes, so `limits = { ... }`, not a block).
#
# Needs what mesh.nomad.hcl needs: the haconnect images on the clients, the
# docker socket for the hook, intentions web -> api, and with Nomad ACLs on
# an ACL policy with read-job on the namespace attached to this job
# (`nomad acl policy apply -namespace default -job mesh-expose ...`): the
# hook reads its allocation through the task API with the task's workload
# identity (identity { env = true } below).
job "mesh-expose" {
  datacenters = ["dc1"]

  group "api" {
    network {
      mode = "bridge"
      port "sidecar_metrics" {
        to = 9102
      }
    }

    service {
      name = "api"
      port = "9001"

      check {
        name     = "api-healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
        expose   = true
      }

      connect {
        sidecar_service {
          proxy {
            config {
              envoy_prometheus_bind_addr = "0.0.0.0:9102"
            }
          }
        }

        sidecar_task {
          driver = "docker"
          config {
            image = "haconnect/haconnect:latest"
            args  = ["nomad-hook"]
            mount {
              type   = "bind"
              source = "/var/run/docker.sock"
              target = "/var/run/docker.sock"
            }
          }
          # The task API (NOMAD_ADDR below) answers only requests with a
          # token: this gives the task its workload identity as NOMAD_TOKEN.
          identity {
            env = true
          }
          env {
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
            NOMAD_ADDR       = "unix://${NOMAD_SECRETS_DIR}/api.sock"
          }
          resources {
            cpu    = 100
            memory = 64
          }
        }
      }
    }

    service {
      name = "api-sidecar-metrics"
      port = "sidecar_metrics"
      tags = ["prometheus"]
    }

    task "api" {
      driver = "docker"
      config {
        image = "haconnect/demo-app:latest"
        args  = ["-listen", "127.0.0.1:9001", "-name", "api"]
      }
      resources {
        cpu    = 100
        memory = 64
      }
    }
  }

  group "web" {
    network {
      mode = "bridge"
      port "http" {
        static = 9002
        to     = 9002
      }
      # An exposed path's listener port: the same number inside the
      # namespace as on the host (to = -1), as Nomad's expose requires.
      port "lb_healthz" {
        static = 9090
        to     = -1
      }
    }

    service {
      name = "web"
      port = "http"

      connect {
        sidecar_service {
          proxy {
            expose {
              path {
                path            = "/healthz"
                protocol        = "http"
                local_path_port = 9002
                listener_port   = "lb_healthz"
              }
            }

            upstreams {
              destination_name = "api"
              local_bind_port  = 8080
              config {
                connect_timeout_ms = 2000
                limits = {
                  max_connections         = 64
                  max_pending_requests    = 32
                  max_concurrent_requests = 64
                }
              }
            }
          }
        }

        sidecar_task {
          driver = "docker"
          config {
            image = "haconnect/haconnect:latest"
            args  = ["nomad-hook"]
            mount {
              type   = "bind"
              source = "/var/run/docker.sock"
              target = "/var/run/docker.sock"
            }
          }
          identity {
            env = true
          }
          env {
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
            NOMAD_ADDR       = "unix://${NOMAD_SECRETS_DIR}/api.sock"
          }
        }
      }
    }

    task "web" {
      driver = "docker"
      config {
        image = "haconnect/demo-app:latest"
        args  = ["-listen", "0.0.0.0:9002", "-name", "web", "-upstream", "http://127.0.0.1:8080/"]
      }
    }
  }
}
