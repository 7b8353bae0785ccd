# The client agent of each node of docker-compose.cluster.yml. The node's
# sidecar reaches it on 127.0.0.1:8500 (the agent shares the node's network
# namespace), as a sidecar on a real host reaches its local agent.
data_dir    = "/consul/data"
client_addr = "0.0.0.0"
log_level   = "warn"
