# web-1 on node-1, with its Connect sidecar. Its upstream api listens on the
# node's address, not only on loopback, so that a load generator outside the
# node (the e2e tests) can play web's app; keep 127.0.0.1 in production.
# No address: the node's address is the service's and the sidecar's.
service {
  id   = "web-1"
  name = "web"
  port = 9002
  connect {
    sidecar_service {
      port = 21000
      proxy {
        local_service_address = "127.0.0.1"
        local_service_port    = 9002
        config {
          protocol     = "http"
          bind_address = "0.0.0.0"
        }
        upstreams {
          destination_name   = "api"
          local_bind_address = "0.0.0.0"
          local_bind_port    = 9191
          config {
            protocol = "http"
          }
        }
      }
    }
  }
}
