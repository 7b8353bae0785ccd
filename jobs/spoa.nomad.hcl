# One shared authorization agent per client node. Sidecars use it with
# `nomad-hook -spoa-addr <client address>:12345` instead of running their
# own; the destination comes with each SPOE message.
job "haconnect-spoa" {
  datacenters = ["dc1"]
  type        = "system"

  group "spoa" {
    network {
      port "spoe" {
        static = 12345
      }
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
          "-listen", "${NOMAD_IP_spoe}:12345",
          "-metrics-listen", "${NOMAD_IP_metrics}:9102",
          "-consul-addr", "http://${attr.unique.network.ip-address}:8500",
        ]
      }

      resources {
        cpu    = 200
        memory = 64
      }

      service {
        name     = "haconnect-spoa"
        port     = "spoe"
        provider = "consul"

        check {
          type     = "tcp"
          interval = "10s"
          timeout  = "2s"
        }
      }
    }
  }
}
