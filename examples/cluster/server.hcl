# The three Consul servers of docker-compose.cluster.yml (the node name,
# bind address and join addresses are on the command line).
server           = true
bootstrap_expect = 3
data_dir         = "/consul/data" # a named volume: a restart keeps Raft, the CA and the trust domain
client_addr      = "0.0.0.0"
log_level        = "warn"
connect {
  enabled = true
}
ui_config {
  enabled = true
}
# Consul's production recommendation (the default, 5, is for small VMs):
# a lost leader is replaced within a few seconds.
performance {
  raft_multiplier = 1
}
