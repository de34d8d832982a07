#!/usr/bin/env bash
# The findings job: Prismer's finding as a seeded measurement, from the main job's cache.
#
#   bash jobs/findings.sh [--out DIR] [--config FILE] [--source S] [--seeds 0,1,2] [--arms A,B,...]
#                         [--split test] [--findings DIR] [--set KEY=VALUE ...] [--no-probe | --probe-only]
#
# DIR (default ./demo-out) is what jobs/demo.sh wrote: DIR/models/{vit,roberta} and DIR/cache. For
# each arm (none, all, shuffled, and each expert alone: depth normal edge seg-coco objdet ocrdet)
# and seed, `trainer fit` + `trainer eval` into DIR/findings-runs/prismer/<arm>/seed<k>/ (a run whose
# eval metrics exist is skipped: rerun to resume); then linear probes of the frozen ViT's tokens and
# of each expert's label for each quantity a question needs. Writes FINDINGS/prismer.json and
# FINDINGS/prismer.md (default FINDINGS: findings/ in this checkout). The frozen models never run
# during the trainings; only the probes run the ViT once over the train and held-out splits.
# Config: jobs/configs/prismer_tabletop.yaml (the main job's Prismer config). Details: jobs/findings_prismer.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
esac
# the main job's environment when it made one, else the python3 on PATH (expertcache installed)
if [ -x "$ROOT/.venv/bin/python" ]; then
  unset VIRTUAL_ENV PYTHONHOME
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec python3 "$ROOT/jobs/findings_prismer.py" --findings "$ROOT/findings" "$@"
