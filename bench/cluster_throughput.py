"""Precompute across Ray nodes: samples/s with one node against two, side by side in one run.

Both sides run `precompute run --address` (the real CLI, engine, actors, Zarr writes, commit
records) against a `LoopbackCluster` on this machine: one node with 1 CPU, then two nodes with
1 CPU each (separate `ray start` process trees, as two machines would run them). The engine puts
one actor on each node, so the ratio is what adding a node buys. Here both nodes share this
machine's cores with the driver and two sets of Ray daemons, so 2.0 is the ceiling and the
daemons' share is what keeps the ratio under it; on real machines each node brings its own.

    python bench/cluster_throughput.py                 # ViT-B/16 (random weights), 96 samples per side
    python bench/cluster_throughput.py --samples 192 --model DIR
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # devsupport/: the checkout's support code, not installed

from cache_schema import validate_cache
from devsupport.loopback_cluster import LoopbackCluster
from vit_models import save_vit_base


def run_on(cpus_per_node: list[int], model: str, samples: int, shard_size: int, batch_size: int, scratch: Path) -> dict:
    """One `precompute run` on a fresh cluster of these nodes; its summary row, parsed."""
    cache = scratch / f"cache-{len(cpus_per_node)}-nodes"
    with LoopbackCluster(cpus_per_node, log_dir=scratch) as cluster:
        began = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "precompute.cli", "run", "--expert", "vit-cls", "--shards", "shapes", "--model", model,
             "--cache", str(cache), "--limit", str(samples), "--source-opt", f"num={samples}", "--shard-size",
             str(shard_size), "--batch-size", str(batch_size), "--address", cluster.address, "--no-progress"],
            capture_output=True, text=True, env=cluster.env)
        wall = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"precompute run on {len(cpus_per_node)} node(s) failed:\n{result.stderr[-3000:]}")
    row = result.stdout.strip().splitlines()[-1].split()
    checked, problems = validate_cache(cache)
    return {"nodes": len(cpus_per_node), "cpus_per_node": cpus_per_node, "nodes_used": int(row[-1]),
            "samples": int(row[5]), "samples_per_s": float(row[-2]), "end_to_end_s": round(wall, 1),
            "shards_validated": checked, "problems": len(problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="timm model directory or name (default: ViT-B/16 from its config)")
    parser.add_argument("--samples", type=int, default=96, help="samples per side (default: 96)")
    parser.add_argument("--shard-size", type=int, default=8, help="samples per shard (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/cluster_throughput.json"), help="JSON results")
    args = parser.parse_args()
    if min(args.samples, args.shard_size, args.batch_size) < 1:
        parser.error("--samples, --shard-size and --batch-size must be >= 1")

    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as scratch:
        scratch = Path(scratch)
        model = args.model or save_vit_base(scratch / "vit-b16")
        sides = []
        for cpus_per_node in ([1], [1, 1]):
            print(f"{len(cpus_per_node)} node(s) ...", flush=True)
            sides.append(run_on(cpus_per_node, model, args.samples, args.shard_size, args.batch_size, scratch))
    one, two = sides
    result = {"config": {"model": args.model or "vit_base_patch16_224 (random init)", "samples": args.samples,
                         "shard_size": args.shard_size, "batch_size": args.batch_size, "machine_cpus": os.cpu_count()},
              "one_node": one, "two_nodes": two,
              "two_over_one": round(two["samples_per_s"] / one["samples_per_s"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for side in sides:
        print(f"{side['nodes']} node(s), {side['nodes_used']} used: {side['samples_per_s']:.2f} samples/s "
              f"({side['end_to_end_s']} s end to end, {side['shards_validated']} shards validated, "
              f"{side['problems']} problems)")
    print(f"two nodes / one node: {result['two_over_one']:.2f}x   ({args.out})")


if __name__ == "__main__":
    main()
