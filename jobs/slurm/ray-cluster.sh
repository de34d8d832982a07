#!/usr/bin/env bash
# Inside a Slurm allocation: start a Ray head on the first node and a Ray worker on every other
# node, wait until all of them have joined, run the given command on the head node with
# RAY_ADDRESS pointing at the cluster, then tear the cluster down and exit with the command's status.
#
#   bash jobs/slurm/ray-cluster.sh precompute run --address auto --expert depth --shards coco ...
#
# Sourced by precompute.sbatch and train.sbatch; usable from any sbatch script or salloc shell.
# Each node gives Ray the CPUs Slurm allocated to it (SLURM_CPUS_PER_TASK) and the GPUs Slurm made
# visible (Ray reads CUDA_VISIBLE_DEVICES). Token authentication is on: the job makes one random
# token and every Ray process of the job gets it through the environment (RAY_AUTH_TOKEN).
set -euo pipefail

if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "ray-cluster.sh: not inside a Slurm allocation (no SLURM_JOB_NODELIST)" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "ray-cluster.sh: give the command to run on the cluster" >&2
  exit 2
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD="${NODES[0]}"
HEAD_IP="$(srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" hostname --ip-address | awk '{print $1}')"
PORT="${RAY_PORT:-6379}"
CPUS="${SLURM_CPUS_PER_TASK:-$(nproc)}"
export RAY_ADDRESS="$HEAD_IP:$PORT" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"
export RAY_AUTH_TOKEN

STEPS=()
teardown() {
  for pid in "${STEPS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap teardown EXIT

echo "ray-cluster.sh: head $HEAD ($RAY_ADDRESS), ${#NODES[@]} node(s), $CPUS CPUs each"
srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" \
  ray start --head --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$CPUS" --include-dashboard=false --block &
STEPS+=($!)

alive_nodes() {
  python3 -c 'import ray; ray.init(logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0
}
for _ in $(seq 1 60); do [ "$(alive_nodes)" -ge 1 ] && break; sleep 5; done
for node in "${NODES[@]:1}"; do
  srun --nodes=1 --ntasks=1 --overlap -w "$node" \
    ray start --address="$RAY_ADDRESS" --num-cpus="$CPUS" --block &
  STEPS+=($!)
done
for _ in $(seq 1 60); do [ "$(alive_nodes)" -ge "${#NODES[@]}" ] && break; sleep 5; done
joined="$(alive_nodes)"
if [ "$joined" -lt "${#NODES[@]}" ]; then
  echo "ray-cluster.sh: only $joined of ${#NODES[@]} nodes joined after 5 minutes" >&2
  exit 1
fi

"$@"
