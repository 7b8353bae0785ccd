#!/bin/sh
# Registers the demo services and the intentions once Consul answers.
set -e
until consul members >/dev/null 2>&1; do sleep 0.5; done
consul services register /etc/haconnect-demo/counting.hcl
consul services register /etc/haconnect-demo/dashboard.hcl
consul config write /etc/haconnect-demo/intentions.hcl
echo "seeded: counting, dashboard, intention dashboard -> counting allow"
