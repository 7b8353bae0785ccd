# counting-1 and its Connect sidecar, as a local agent would register them.
service {
  id      = "counting-1"
  name    = "counting"
  address = "10.87.53.10"
  port    = 9001

  connect {
    sidecar_service {
      address = "10.87.53.10"
      port    = 21000
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
