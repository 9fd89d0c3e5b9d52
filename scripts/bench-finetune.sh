#!/usr/bin/env bash
# Fine-tuning speed: median examples/s of `frugal finetune` per method on all-MiniLM-L6-v2, batch
# BATCH × 64 tokens (BBC articles, all longer than 64 tokens, so every batch is full), and of the
# PyTorch twin (scripts/bench-finetune-torch.py) when PYTHON has torch and transformers.
#
# Usage: scripts/bench-finetune.sh [BATCH] [STEPS]      (default 32 10)
# Env: FRUGAL (binary, default target/release/frugal), DATA (default data/finetune),
#      PYTHON (default python3), THREADS (default 2), METHODS (default "adamw lora frugal-ft").
set -euo pipefail
batch=${1:-32}
steps=${2:-10}
frugal=${FRUGAL:-target/release/frugal}
data=${DATA:-data/finetune}
python=${PYTHON:-python3}
threads=${THREADS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

for method in ${METHODS:-adamw lora frugal-ft}; do
  "$frugal" finetune --model "$data/all-MiniLM-L6-v2" --data "$data/bbc-news" --max-len 64 \
    --batch-size "$batch" --steps "$steps" --log-every 1 --eval-every 1000 --val-fraction 0.02 \
    --test-fraction 0 --method "$method" --threads "$threads" --out "$out/${method//[:=]/-}" \
    > "$out/${method//[:=]/-}.log" 2>&1
  # The first two steps warm up.
  rate=$(grep '"tok_per_s"' "$out/${method//[:=]/-}/metrics.jsonl" | tail -n +3 \
    | sed 's/.*"tok_per_s":\([0-9.e+-]*\).*/\1/' | median)
  printf "frugal %-32s %6.1f examples/s\n" "$method" "$rate"
done
if "$python" -c "import torch, transformers" 2> /dev/null; then
  "$python" "$(dirname "$0")/bench-finetune-torch.py" "$data/all-MiniLM-L6-v2" \
    --batch-size "$batch" --seq-len 64 --threads "$threads" --steps "$steps" 2> /dev/null | tail -1
else
  echo "(no torch and transformers for $python: the PyTorch twin is skipped)"
fi
