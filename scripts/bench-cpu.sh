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
# Env: FRUGAL (binary, default target/release/frugal), BEFORE (an earlier build of frugal to
#      time in the same rounds, for a before/after table), THREADS (default: all cores),
#      ROUNDS (default 2), TORCH_VENV (default .venv-torch)
set -euo pipefail
steps=${1:-12}
models=${2:-tiny 20m 60m}
frugal=${FRUGAL:-target/release/frugal}
before=${BEFORE:-}
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

# Median step time (ms) of `frugal train` with binary $1 into run directory $2.
frugal_step() {
  "$1" train --model "$model" --optimizer adamw --steps "$steps" --batch-size 8 \
    --seq-len "$seq" --eval-every 100000 --eval-tokens 256 --threads "$threads" \
    --out "$2" >"$2.log" 2>&1
  # Step time from each step's tokens/s, without the first two steps.
  grep '"tok_per_s"' "$2/metrics.jsonl" | tail -n +3 |
    sed 's/.*"tok_per_s":\([0-9.e+-]*\).*/\1/' |
    awk -v t=$((8 * seq)) '{print 1000 * t / $1}' | median
}

header=$(printf "%-6s %-10s %14s %14s %8s" model batch "frugal ms" "PyTorch ms" ratio)
[[ -n $before ]] && header+=$(printf " %14s %8s" "before ms" speedup)
echo "$header"
for model in $models; do
  seq=256
  [[ $model == tiny ]] && seq=128
  frugal_ms=() torch_ms=() before_ms=()
  for round in $(seq "$rounds"); do
    if [[ -n $before ]]; then
      before_ms+=("$(frugal_step "$before" "$out/$model-$round-before")")
    fi
    frugal_ms+=("$(frugal_step "$frugal" "$out/$model-$round")")
    torch_ms+=("$("$venv/bin/python" "$twin" --model "$model" --device cpu --batch-size 8 \
      --seq-len "$seq" --steps "$steps" --threads "$threads" 2>/dev/null |
      sed 's/.*median \([0-9.]*\) ms.*/\1/')")
  done
  f=$(printf "%s\n" "${frugal_ms[@]}" | median)
  t=$(printf "%s\n" "${torch_ms[@]}" | median)
  line=$(printf "%-6s %-10s %14.1f %14.1f %7.2fx" "$model" "8x$seq" "$f" "$t" \
    "$(awk -v f="$f" -v t="$t" 'BEGIN {print t / f}')")
  if [[ -n $before ]]; then
    b=$(printf "%s\n" "${before_ms[@]}" | median)
    line+=$(printf " %14.1f %7.2fx" "$b" "$(awk -v f="$f" -v b="$b" 'BEGIN {print b / f}')")
  fi
  echo "$line"
done
