#!/usr/bin/env bash
# Data parallelism against one process on this machine, in one run: the same global batch and
# data order as one process (--batch-size B×N) and as N ranks under mpirun (--batch-size B
# each), then their losses, throughput, wall time and optimizer state per rank.
#   scripts/bench-data-parallel.sh [MODEL] [BATCH PER RANK] [RANKS] [STEPS] [OPTIMIZER]
#   (defaults: tiny 4 2 200 frugal)
# Needs a build with MPI: scripts/setup-mpi.sh && cargo build --release -p frugal-cli --features mpi
set -euo pipefail
model=${1:-tiny}
batch=${2:-4}
ranks=${3:-2}
steps=${4:-200}
optimizer=${5:-frugal}
bin=${FRUGAL:-target/release/frugal}
out=${OUT:-runs/bench-data-parallel}
[ -x "$bin" ] || { echo "no $bin: build it with --features mpi first" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf "$out"
mkdir -p "$out"
flags=(--model "$model" --steps "$steps" --optimizer "$optimizer" --eval-every "$steps"
       --log-every 1)
t0=$(date +%s.%N)
"$bin" train "${flags[@]}" --batch-size $((batch * ranks)) --out "$out/one" >"$out/one.log" 2>&1 ||
  { echo "one process failed: see $out/one.log" >&2; exit 1; }
t1=$(date +%s.%N)
mpirun -np "$ranks" --oversubscribe "$bin" train "${flags[@]}" --batch-size "$batch" \
  --out "$out/ranks" >"$out/ranks.log" 2>&1 ||
  { echo "$ranks ranks failed: see $out/ranks.log" >&2; exit 1; }
t2=$(date +%s.%N)
python3 - "$out" "$t0" "$t1" "$t2" "$ranks" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[5]
t0, t1, t2 = map(float, sys.argv[2:5])
one_s, ranks_s = t1 - t0, t2 - t1
def run(name):
    s = json.load(open(f"{out}/{name}/summary.json"))
    losses = [json.loads(l)["loss"] for l in open(f"{out}/{name}/metrics.jsonl") if '"loss"' in l]
    return s, losses
one, a = run("one")
many, b = run("ranks")
worst = max(abs(x - y) for x, y in zip(a, b))
mib = lambda x: x / 2**20
print(f"{'run':<12} {'wall s':>8} {'tok/s':>8} {'val loss':>10} {'state MiB per rank':>20} {'peak RSS MiB per rank':>22}")
print(f"{'1 process':<12} {one_s:8.1f} {one['tokens_per_s']:8.0f} {one['val_loss']:10.4f} "
      f"{mib(one['optimizer_state_total_bytes']):20.1f} {mib(one['peak_rss_bytes']):22.0f}")
shares = " + ".join(f"{mib(x):.1f}" for x in many["optimizer_state_bytes_per_rank"])
rss = " + ".join(f"{mib(x):.0f}" for x in many["peak_rss_bytes_per_rank"])
print(f"{n + ' ranks':<12} {ranks_s:8.1f} {many['tokens_per_s']:8.0f} {many['val_loss']:10.4f} {shares:>20} {rss:>22}")
print(f"ranks / one process: wall {ranks_s / one_s:.2f}×, throughput {many['tokens_per_s'] / one['tokens_per_s']:.2f}×; "
      f"largest per-step loss difference {worst:.2e} over {len(a)} steps")
PY
