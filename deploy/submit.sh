#!/usr/bin/env bash
# Submit a kdpipe run to a Ray cluster as a job, from the repository root:
#
#   deploy/submit.sh configs/<x>.yaml [more `kdpipe run` arguments]
#
# The job server defaults to the loopback address http://127.0.0.1:8265: a head started on
# this machine (`ray start --head --dashboard-host 127.0.0.1`), or a cluster head whose
# dashboard port is forwarded here (`ray dashboard deploy/cluster-tpu.yaml`). Set RAY_ADDRESS
# to submit elsewhere. A Ray 2.60 head has token authentication on when a token existed as it
# started (`ray get-auth-token --generate` makes ~/.ray/auth_token); a client sends its token
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) only in token mode: this script
# keeps that mode on, and stops with exit code 2 before submitting when it has no token.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: deploy/submit.sh configs/<x>.yaml [kdpipe run arguments]}
shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
fail() { echo "deploy/submit.sh: error: $*" >&2; exit 2; }
command -v ray >/dev/null ||
  fail "no \`ray\` on PATH: activate the environment kdpipe is installed in (source .venv/bin/activate)."
# Ray's own lookup (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token), so
# that a missing token is this one paragraph rather than the client's traceback.
if [ "$RAY_AUTH_MODE" = token ] && ! ray get-auth-token >/dev/null 2>&1; then
  fail "no Ray authentication token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token):" \
    "the job server of a head with token authentication refuses a client without one. For a" \
    "head on this machine, run \`ray get-auth-token --generate\` (it writes ~/.ray/auth_token)" \
    "BEFORE \`ray start --head\` (a head started with no token runs without authentication;" \
    "see deploy/README.md); for a remote cluster, copy its token to ~/.ray/auth_token."
fi
exec ray job submit --working-dir . --runtime-env deploy/runtime_env.yaml \
  -- kdpipe run "$config" "$@"
