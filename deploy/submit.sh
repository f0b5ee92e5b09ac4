#!/usr/bin/env bash
# Submit a kdpipe run to a Ray cluster as a job, from the repository root:
#
#   deploy/submit.sh configs/<x>.yaml [more `kdpipe run` arguments]
#
# The job server defaults to the loopback address http://127.0.0.1:8265: a head started on
# this machine (`ray start --head --dashboard-host 127.0.0.1`), or a cluster head whose
# dashboard port is forwarded here (`ray dashboard deploy/cluster-tpu.yaml`). Set RAY_ADDRESS
# to submit elsewhere. Ray 2.60 heads require token authentication, and the client sends its
# token (~/.ray/auth_token, or RAY_AUTH_TOKEN) only in token mode: this script keeps it on.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: deploy/submit.sh configs/<x>.yaml [kdpipe run arguments]}
shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml \
  -- kdpipe run "$config" "$@"
