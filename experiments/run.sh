#!/usr/bin/env bash
# Run one experiment (or all) and keep its light results in experiments/results/NAME:
#   bash experiments/run.sh async   # or: multidomain | hierarchical | hetero_rank | split_schedulers | split_schedulers_noniid | split_v | split_bytes | all
# Heavy run folders (adapters, checkpoints) stay under runs/sweeps/NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
[ "${names[0]:-all}" = all ] && names=(async hierarchical hetero_rank multidomain split_schedulers split_schedulers_noniid split_v split_bytes)
for name in "${names[@]}"; do
  .venv/bin/edgelam sweep "experiments/$name.yaml" --out "runs/sweeps/$name"
  dest="experiments/results/$name"
  mkdir -p "$dest"
  cp "runs/sweeps/$name"/{results.md,curves.png} "$dest/"
  [ -f "runs/sweeps/$name/split.png" ] && cp "runs/sweeps/$name/split.png" "$dest/"
  for run in runs/sweeps/"$name"/*/; do
    v=$(basename "$run")
    mkdir -p "$dest/$v"
    cp "$run/metrics.jsonl" "$run/summary.json" "$dest/$v/"
  done
done
