#!/usr/bin/env bash
# Peak memory and step time of each memory mode, and of attention computed whole (the
# scores and probabilities kept) instead of fused, in one run: `frugal train` on the same model,
# batch and data for every mode, read back from each run's summary and metrics.
#   scripts/bench-memory.sh [MODEL] [BATCH] [SEQ] [STEPS]   (defaults: 60m 8 256 6)
# Needs a release build (cargo build --release); FRUGAL=path/to/frugal picks another binary.
set -euo pipefail
model=${1:-60m}
batch=${2:-8}
seq=${3:-256}
steps=${4:-6}
bin=${FRUGAL:-target/release/frugal}
out=${OUT:-runs/bench-memory}
[ -x "$bin" ] || { echo "no $bin: run cargo build --release first" >&2; exit 1; }
mkdir -p "$out"
# Prepare (and cache) the tokenized data first, so that no mode's peak includes it.
"$bin" train --model "$model" --batch-size 1 --seq-len 8 --steps 1 --warmup 0 --eval-tokens 8 \
  --out "$out/prepare" >"$out/prepare.log" 2>&1 ||
  { echo "data preparation failed: see $out/prepare.log" >&2; exit 1; }
modes=("normal:" "checkpointing:--activation-checkpointing" "per-layer:--per-layer-updates"
       "loss-chunks:--loss-chunks 8" "low:--memory low" "whole-attention:--attention whole")
printf '%-14s %12s %12s %10s %8s\n' mode "peak RSS MB" "vs normal" "step ms" "vs normal"
base_rss=""
base_ms=""
for entry in "${modes[@]}"; do
  name=${entry%%:*}
  flags=${entry#*:}
  dir="$out/$name"
  rm -rf "$dir"
  # shellcheck disable=SC2086
  "$bin" train --model "$model" --batch-size "$batch" --seq-len "$seq" --steps "$steps" \
    --warmup 0 --eval-tokens "$seq" --eval-every "$steps" --save-every "$steps" \
    --keep-checkpoints 1 --out "$dir" $flags >"$dir.log" 2>&1 ||
    { echo "$name failed: see $dir.log" >&2; exit 1; }
  read -r rss ms < <(python3 - "$dir" <<'PY'
import json, statistics, sys
d = sys.argv[1]
s = json.load(open(f"{d}/summary.json"))
rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
steps = [r for r in rows if r.get("kind", "train") == "train" and "tok_per_s" in r]
tokens = steps[1]["tokens"] - steps[0]["tokens"] if len(steps) > 1 else steps[0]["tokens"]
# The first step allocates the optimizer state: the median of the later ones.
ms = statistics.median(1000 * tokens / r["tok_per_s"] for r in steps[1:] or steps)
print(s["peak_rss_bytes"] / 1e6, ms)
PY
)
  rm -rf "$dir/checkpoints" # hundreds of MB per mode; the summary and metrics stay
  base_rss=${base_rss:-$rss}
  base_ms=${base_ms:-$ms}
  python3 -c "import sys; n,r,m,br,bm=sys.argv[1:]; print(f'{n:<14} {float(r):>12.0f} {float(r)/float(br):>12.2f} {float(m):>10.0f} {float(m)/float(bm):>8.2f}')" \
    "$name" "$rss" "$ms" "$base_rss" "$base_ms"
done
