#!/usr/bin/env bash
# CPU training speed against PyTorch: the median step time of `frugal train` (AdamW) and of the
# project's PyTorch twin of the same model and loop (scripts/torch-llama-twin.py: eager, AdamW)
# for `tiny` (batch 8 × 128), `20m` and `60m` (batch 8 × 256), the two interleaved in rounds,
# and the ratio (> 1: frugal is faster).
#
# The first run installs PyTorch from PyPI into .venv-torch/ (about 4 GB: PyPI's Linux wheel
# brings its CUDA libraries, unused here).
#
# Usage: scripts/bench-cpu.sh [STEPS] [MODELS]      (default 12 "tiny 20m 60m")
# Env: FRUGAL (binary, default target/release/frugal), THREADS (default: all cores),
#      ROUNDS (default 2), TORCH_VENV (default .venv-torch)
set -euo pipefail
steps=${1:-12}
models=${2:-tiny 20m 60m}
frugal=${FRUGAL:-target/release/frugal}
threads=${THREADS:-$(nproc)}
rounds=${ROUNDS:-2}
venv=${TORCH_VENV:-.venv-torch}
twin=$(dirname "$0")/torch-llama-twin.py
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing PyTorch into $venv (first use)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.9.1 numpy
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

printf "%-6s %-10s %14s %14s %8s\n" model batch "frugal ms" "PyTorch ms" ratio
for model in $models; do
  seq=256
  [[ $model == tiny ]] && seq=128
  frugal_ms=() torch_ms=()
  for round in $(seq "$rounds"); do
    run=$out/$model-$round
    "$frugal" train --model "$model" --optimizer adamw --steps "$steps" --batch-size 8 \
      --seq-len "$seq" --eval-every 100000 --eval-tokens 256 --threads "$threads" \
      --out "$run" >"$run.log" 2>&1
    # Step time from each step's tokens/s, without the first two steps.
    frugal_ms+=("$(grep '"tok_per_s"' "$run/metrics.jsonl" | tail -n +3 |
      sed 's/.*"tok_per_s":\([0-9.e+-]*\).*/\1/' |
      awk -v t=$((8 * seq)) '{print 1000 * t / $1}' | median)")
    torch_ms+=("$("$venv/bin/python" "$twin" --model "$model" --device cpu --batch-size 8 \
      --seq-len "$seq" --steps "$steps" --threads "$threads" 2>/dev/null |
      sed 's/.*median \([0-9.]*\) ms.*/\1/')")
  done
  f=$(printf "%s\n" "${frugal_ms[@]}" | median)
  t=$(printf "%s\n" "${torch_ms[@]}" | median)
  printf "%-6s %-10s %14.1f %14.1f %7.2fx\n" "$model" "8x$seq" "$f" "$t" \
    "$(awk -v f="$f" -v t="$t" 'BEGIN {print t / f}')"
done
