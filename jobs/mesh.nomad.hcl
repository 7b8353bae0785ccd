# Two services in a Consul Connect mesh, each with haconnect as its sidecar:
# web calls api through its upstream on 127.0.0.1:8080.
#
# Nomad injects a sidecar task (connect-proxy-<service>) for every
# `connect { sidecar_service {} }`; `sidecar_task` replaces its image and
# arguments with haconnect's nomad-hook, which launches one HAProxy
# container per allocation in the allocation's network namespace.
# Needs: the haconnect images on the clients (`make images`), the docker
# socket reachable by the hook (host volume or docker plugin volumes), and
# intentions web -> api (`consul intention create web api`). The socket is
# the hook's alone: the HAProxy container mounts only the hook's working
# directory (${NOMAD_SECRETS_DIR}/haconnect) and runs unprivileged.
# The hook reads its allocation through Nomad's task API socket, which
# answers only requests carrying a token, even with ACLs off: each
# sidecar_task exposes its workload identity (identity { env = true }, as
# NOMAD_TOKEN). With Nomad ACLs on, attach an ACL policy with read-job on
# the namespace to this job (`nomad acl policy apply -namespace default
# -job mesh ...`).
job "mesh" {
  datacenters = ["dc1"]

  group "api" {
    network {
      mode = "bridge"
      port "admin" {
        to = 19100
      }
    }

    service {
      name = "api"
      port = "9001"

      connect {
        sidecar_service {}

        sidecar_task {
          driver = "docker"
          config {
            image = "haconnect/haconnect:latest"
            args  = ["nomad-hook", "-admin-bind", "0.0.0.0:19100"]
            mount {
              type   = "bind"
              source = "/var/run/docker.sock"
              target = "/var/run/docker.sock"
            }
          }
          identity {
            env = true # NOMAD_TOKEN for the task API socket
          }
          env {
            # Sidecar tasks get no CONSUL_HTTP_ADDR; the local agent is
            # reachable on the client's address.
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
    }

    service {
      name = "web"
      port = "http"

      connect {
        sidecar_service {
          proxy {
            upstreams {
              destination_name = "api"
              local_bind_port  = 8080
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
            env = true # NOMAD_TOKEN for the task API socket
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
