#!/bin/sh
# Writes the intentions once the cluster has a leader (the services are
# registered by their nodes' agents, from their files).
set -e
until consul config write /etc/haconnect-cluster/intentions.hcl >/dev/null 2>&1; do sleep 1; done
echo "seeded: intention web -> api allow, * -> api deny"
