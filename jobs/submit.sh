#!/usr/bin/env bash
# Submit one bertpipe run to a Ray cluster through the Jobs API (the dashboard port, 8265).
#   jobs/submit.sh [CONFIG] [--set key=value ...]
#   RAY_API_SERVER_ADDRESS=http://head:8265 jobs/submit.sh configs/example.yaml \
#     --set output.path=s3://bucket/out --set "input.paths=[s3://bucket/events/dt=2026-11-28/]"
# This checkout's source (pipeline/) travels with the job as the module `bertpipe` (runtime_env
# py_modules, staged by jobs/stage_source.py), and the checkout itself as the job's working dir (configs/,
# jobs/; excludes in jobs/runtime_env.yaml): local edits run without rebuilding the cluster image.
#
# Token auth (Ray 2.60): a cluster started with RAY_AUTH_MODE=token rejects clients without its token.
# The client needs RAY_AUTH_MODE=token too (defaulted below) and the token in RAY_AUTH_TOKEN, or in the file
# named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (`ray get-auth-token` prints the one Ray finds).
set -euo pipefail
cd "$(dirname "$0")/.."

config=${1:-configs/example.yaml}
shift $(($# > 0 ? 1 : 0))
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
runtime_env=$(python jobs/stage_source.py "$stage")

# The driver runs inside the cluster, so runtime.address=auto attaches to it instead of starting a local Ray.
ray job submit \
  --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env "$runtime_env" \
  -- python -m bertpipe run "$config" --set runtime.address=auto "$@"
