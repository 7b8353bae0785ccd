# The api half of mesh.nomad.hcl with the sidecar written out as a task:
# `kind = "connect-proxy:api"` tells Nomad this task is the service's
# proxy, so it injects none, and the prestart lifecycle with sidecar = true
# keeps it running beside the app. Use this form to set what sidecar_task
# cannot change, such as lifecycle (sidecar_task can set identity blocks:
# nomad/structs/services.go, SidecarTask.MergeIntoTask). With Nomad ACLs on,
# attach an ACL policy with read-job on the namespace to this job.
job "mesh-prestart" {
  datacenters = ["dc1"]

  group "api" {
    network {
      mode = "bridge"
    }

    service {
      name = "api"
      port = "9001"

      connect {
        sidecar_service {}
      }
    }

    task "connect-proxy-api" {
      kind   = "connect-proxy:api"
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      identity {
        env = true # NOMAD_TOKEN for the task API socket
      }

      config {
        image = "haconnect/haconnect:latest"
        args  = ["nomad-hook", "-service", "api"]
        mount {
          type   = "bind"
          source = "/var/run/docker.sock"
          target = "/var/run/docker.sock"
        }
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

    task "api" {
      driver = "docker"
      config {
        image = "haconnect/demo-app:latest"
        args  = ["-listen", "127.0.0.1:9001", "-name", "api"]
      }
    }
  }
}
