# api-2 on node-3, with its Connect sidecar: one of the two instances of api.
service {
  id   = "api-2"
  name = "api"
  port = 9001
  connect {
    sidecar_service {
      port = 21000
      proxy {
        local_service_address = "127.0.0.1"
        local_service_port    = 9001
        config {
          protocol     = "http"
          bind_address = "0.0.0.0"
        }
      }
    }
  }
}
