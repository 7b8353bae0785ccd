# dashboard-1 calls counting through its sidecar's upstream 127.0.0.1:9191.
service {
  id      = "dashboard-1"
  name    = "dashboard"
  address = "10.87.53.20"
  port    = 9002

  connect {
    sidecar_service {
      address = "10.87.53.20"
      port    = 21000
      proxy {
        local_service_address = "127.0.0.1"
        local_service_port    = 9002
        config {
          protocol     = "http"
          bind_address = "0.0.0.0"
        }
        upstreams {
          destination_name = "counting"
          local_bind_port  = 9191
          config {
            protocol = "http"
          }
        }
      }
    }
  }
}
