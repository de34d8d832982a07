#!/usr/bin/env bash
# Run `precompute` or `trainer` on a running Ray cluster through its job server, shipping this
# checkout as the job's working directory (so the cluster runs exactly this code):
#
#   export RAY_ADDRESS=http://HEAD:8265          # the cluster's dashboard / job server
#   bash jobs/ray/submit.sh precompute run --expert depth --shards coco --data-root /data/coco --cache /shared/cache
#   bash jobs/ray/submit.sh trainer fit --cache /shared/cache --config jobs/configs/epalm_shapes.yaml --out /shared/runs/epalm
#
# `precompute run` and `trainer fit` get --address auto (the job's driver joins the cluster it was
# submitted to; `trainer fit --workers N` then puts its N Ray Train workers on the cluster's GPUs).
# The cluster's image must hold expertcache's dependencies (pip install -e ".[dev]" or the
# Dockerfile in jobs/k8s); paths (--cache, --data-root, --out) are paths on the cluster, on storage
# every node sees. With token authentication on (Ray's default), export the cluster's token as
# RAY_AUTH_TOKEN here too; `ray job submit` sends it. Extra `ray job submit` options (e.g.
# --no-wait, --submission-id ID) go in RAY_JOB_SUBMIT_OPTIONS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server of the cluster, e.g. http://head:8265}"
if [ $# -lt 2 ]; then
  echo "usage: submit.sh precompute|trainer COMMAND [ARGS...]" >&2
  exit 2
fi
tool="$1"
shift
case "$tool" in
  precompute) command=(python -m precompute.cli "$@") ;;
  trainer) command=(python -m trainer.cli "$@") ;;
  *) echo "submit.sh: the first argument must be precompute or trainer, got '$tool'" >&2; exit 2 ;;
esac
if [[ "$tool $1" == "precompute run" || "$tool $1" == "trainer fit" ]] && [[ " $* " != *" --address"* ]]; then
  command+=(--address auto)
fi
# shellcheck disable=SC2086
ray job submit --address "$RAY_ADDRESS" --working-dir "$ROOT" ${RAY_JOB_SUBMIT_OPTIONS:-} \
  --runtime-env-json '{"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}, "excludes": [".git", ".venv", "demo-out", "cache", "runs"]}' \
  -- "${command[@]}"
