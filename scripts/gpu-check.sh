#!/usr/bin/env bash
# Every GPU check of the CUDA build in one run, results under $OUT (default gpu-check/):
#   1. 20 steps of `tiny` on the CPU and on the GPU in f32 (AdamW: signSGD, FRUGAL's state-free
#      rule, turns last-bit differences of near-zero gradients into ±lr steps): the losses agree;
#   2. every preset's and projection's optimizer step on the GPU against the CPU (the `cuda`
#      test binary of the frugal crate, when present);
#   3. bf16 mixed-precision training of `60m` for 200 steps: the loss falls;
#   4. the device memory in use at the peak (nvidia-smi, sampled) next to `frugal memory`'s plan,
#      and with --memory low;
#   5. tokens/s of `60m` and `130m` with `adamw` and `frugal`, f32 and bf16, next to the PyTorch
#      twin (scripts/torch-llama-twin.py) of the same model and loop, in the same run.
#
#   6. the optimizer step on the 60M parameter set against a device copy of the same bytes;
#   7. the top 5 kernels of a profiled training step (nsys);
#   8. the SVD refresh of `130m` and `350m` on the GPU: exact (host) and randomized (device);
#   9. NCCL at world size 1: every collective against a single process's (frugal-dist's `nccl`
#      test), and `tiny` trained as one torchrun-style rank against one process;
#  10. `frugal generate` (keys and values kept on the device): greedy text of check 1's `tiny`
#      for three prompts of different lengths, decoded together, on the GPU against the CPU, and
#      tokens/s of the first large model, one sample and 8 together;
#  11. LoRA (`--optimizer lora`, the adapted linears through candle's operations on the GPU):
#      20 steps of `tiny` on the CPU and on the GPU agree as in check 1, and `frugal eval` of the
#      GPU run's checkpoint (adapters merged) gives its last validation loss.
#
# Build on a machine with Rust (no GPU needed), then carry target/cuda/gpu-check.tar.xz (the
# binary, built with NCCL, the GPU tests and the benchmarks) to the GPU machine:
#   scripts/build-cuda.sh --checks
# Usage: scripts/gpu-check.sh            (QUICK=1 DEVICE=cpu: a dry run of the plumbing)
#        CHECKS="1 2 3" scripts/gpu-check.sh   (some of the checks; 3 includes 4)
set -uo pipefail
out=${OUT:-gpu-check}
pack=target/cuda/gpu-check
if [[ -f target/cuda/gpu-check.tar.xz && ! -d $pack ]]; then
  tar -xJf target/cuda/gpu-check.tar.xz -C target/cuda
fi
bin=${FRUGAL:-$pack/frugal}
tests=${CUDA_TESTS:-$pack/frugal-cuda-test}
bench=${STEP_BENCH:-$pack/step-bench}
refresh=${REFRESH_BENCH:-$pack/refresh-bench}
nccl_test=${NCCL_TEST:-$pack/nccl-test}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export FRUGAL_CACHE=$out/cache
# The binary links NCCL: where the system has no libnccl.so.2, PyTorch's wheel brings one.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2'; then
  nccl_lib=$("$python" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
  [[ -n $nccl_lib ]] && export LD_LIBRARY_PATH=$nccl_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
summary=$out/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
if [[ -n ${QUICK:-} ]]; then
  big=(tiny) steps=4 bf16_model=tiny bf16_steps=20 batch=4 seq=128
else
  big=(60m 130m) steps=20 bf16_model=60m bf16_steps=200 batch=32 seq=256
fi

command -v nvidia-smi >/dev/null && nvidia-smi >"$out/nvidia-smi.txt" 2>&1
if ! version=$("$bin" --version 2>&1); then
  say "the binary does not start (a CUDA or NCCL library missing?): $version"
  exit 1
fi
say "device $device; $version"

# Median of the tok_per_s of a run's metrics, without its first two steps.
tok_per_s() {
  grep '"tok_per_s"' "$1/metrics.jsonl" | tail -n +3 |
    sed 's/.*"tok_per_s":\([0-9.e+-]*\).*/\1/' | sort -g |
    awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'
}
# Peak memory.used (MiB) of GPU 0 while a command runs.
with_peak_memory() {
  local file=$1
  shift
  : >"$file"
  if command -v nvidia-smi >/dev/null; then
    (while true; do
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >>"$file"
      sleep 0.2
    done) &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    return $rc
  fi
  "$@"
}
peak() { sort -g "$1" | tail -1 | grep . || echo "n/a"; }

# 20 steps of `tiny` in f32 with optimizer $2 on the CPU and on the GPU, into $out/$3-cpu and
# $out/$3-gpu: the losses agree (reported as check $1).
cpu_against_gpu() {
local flags=(--steps 20 --eval-every 20 --eval-tokens 4096 --log-every 1 --optimizer "$2")
"$bin" train "${flags[@]}" --device cpu --out "$out/$3-cpu" >"$out/$3-cpu.log" 2>&1
"$bin" train "${flags[@]}" --device "$device" --out "$out/$3-gpu" >"$out/$3-gpu.log" 2>&1
"$python" - "$out/$3-cpu" "$out/$3-gpu" "$1" "$2" <<'EOF' | tee -a "$summary"
import json, sys
def losses(run):
    return [json.loads(l)["loss"] for l in open(f"{run}/metrics.jsonl") if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
verdict = "ok" if len(a) == len(b) == 20 and worst < 1e-3 else "DIFFERENT"
print(f"{sys.argv[3]}. tiny f32 {sys.argv[4]}, 20 steps: largest relative loss difference CPU vs GPU "
      f"{worst:.2e} (tolerance 1e-3): {verdict}; final {a[-1]:.4f} vs {b[-1]:.4f}")
EOF
}

# 1. tiny, CPU against GPU, f32.
check1() {
cpu_against_gpu 1 adamw tiny
}

# 2. The optimizer's step on the GPU for every preset and projection.
check2() {
if [[ -x $tests ]]; then
  if "$tests" --nocapture >"$out/engines.txt" 2>&1; then
    say "2. optimizer on the GPU vs the CPU: $(grep -c 'largest difference' "$out/engines.txt") configurations agree (engines.txt)"
  else
    say "2. optimizer on the GPU vs the CPU: FAILED (engines.txt)"
  fi
else
  say "2. skipped: no test binary at $tests"
fi
}

# 3 and 4. bf16 training with a falling loss; device memory against the plan.
check3() {
run=$out/$bf16_model-bf16
with_peak_memory "$out/memory-bf16.txt" "$bin" train --device "$device" --dtype bf16 \
  --model "$bf16_model" --steps "$bf16_steps" --batch-size "$batch" --seq-len "$seq" \
  --eval-every "$bf16_steps" \
  --eval-tokens 16384 --out "$run" >"$run.log" 2>&1
"$python" - "$run" <<'EOF' | tee -a "$summary"
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
loss = [r["loss"] for r in rows if "loss" in r]
ppl = [r["val_ppl"] for r in rows if "val_ppl" in r]
ok = len(loss) > 10 and sum(loss[-10:]) < sum(loss[:10]) and ppl[-1] < ppl[0]
print(f"3. bf16 training, {len(loss)} steps: loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
      f"val perplexity {ppl[0]:.1f} -> {ppl[-1]:.1f}: {'falls' if ok else 'DOES NOT FALL'}")
EOF
# The planned peak of the selected memory mode, bf16 through tensor operations (`frugal memory`).
planned() {
  "$bin" memory --device "$device" --dtype bf16 --model "$bf16_model" --batch-size "$batch" \
    --seq-len "$seq" --json "$@" >"$out/plan.json"
  "$python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(max(s['peak_bytes'] for s in r['steps'] if s['selected'])/2**20))" "$out/plan.json"
}
say "4. device memory at the peak: $(peak "$out/memory-bf16.txt") MiB in use (nvidia-smi, including the CUDA context and the allocator's cache); planned peak $(planned) MiB"
# The same step with --memory low (checkpointing, per-layer updates, the loss in chunks).
low=$out/$bf16_model-bf16-low
with_peak_memory "$out/memory-bf16-low.txt" "$bin" train --device "$device" --dtype bf16 \
  --model "$bf16_model" --memory low --steps 20 --batch-size "$batch" --seq-len "$seq" \
  --eval-every 20 --eval-tokens 16384 --out "$low" >"$low.log" 2>&1
say "4. with --memory low: $(peak "$out/memory-bf16-low.txt") MiB in use at the peak (planned $(planned --memory low) MiB), $(tok_per_s "$low") tok/s"
}

# 5. Speed against the PyTorch twin, interleaved, same batch and sequence length.
check5() {
say "5. tokens/s, batch $batch x $seq:"
for model in "${big[@]}"; do
  for dtype in f32 bf16; do
    for opt in adamw frugal; do
      run=$out/speed-$model-$opt-$dtype
      "$bin" train --device "$device" --model "$model" --optimizer "$opt" --dtype "$dtype" \
        --steps "$steps" --batch-size "$batch" --seq-len "$seq" --eval-every 100000 \
        --eval-tokens 256 --out "$run" >"$run.log" 2>&1
      say "   frugal $model $opt $dtype: $(tok_per_s "$run") tok/s"
    done
    if "$python" -c "import torch" 2>/dev/null; then
      "$python" "$(dirname "$0")/torch-llama-twin.py" --model "$model" --device "$device" \
        --dtype "$dtype" --batch-size "$batch" --seq-len "$seq" --steps "$steps" 2>&1 |
        tail -1 | sed 's/^/   /' | tee -a "$summary"
    fi
  done
done
}

# 6. The optimizer step against a device copy of the same bytes.
check6() {
if [[ -x $bench ]]; then
  FRUGAL_BENCH_DEVICE=$device "$bench" --quick >"$out/step-bench.txt" 2>&1
  say "6. optimizer step, 60M parameter set (step-bench.txt):"
  grep -E "copy|memcpy|AdamW|steady|refresh step|columns" "$out/step-bench.txt" |
    sed 's/^/   /' | tee -a "$summary"
else
  say "6. skipped: no step benchmark at $bench"
fi
}

# 7. The top kernels of a profiled run.
check7() {
if command -v nsys >/dev/null; then
  nsys profile --force-overwrite true -o "$out/profile" "$bin" train --device "$device" \
    --model "${big[0]}" --optimizer frugal --steps 5 --batch-size "$batch" --seq-len "$seq" \
    --eval-every 100000 --eval-tokens 256 --out "$out/profiled" >"$out/profile.log" 2>&1
  nsys stats --report cuda_gpu_kern_sum --format csv "$out/profile.nsys-rep" \
    >"$out/kernels.csv" 2>>"$out/profile.log"
  say "7. top 5 kernels (share of GPU time, calls, name):"
  "$python" - "$out/kernels.csv" <<'EOF' | tee -a "$summary"
import csv, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
start = next(i for i, l in enumerate(lines) if l.startswith("Time"))
for row in list(csv.DictReader(lines[start:]))[:5]:
    print(f"   {float(row['Time (%)']):5.1f}%  {row['Instances']:>6}  {row['Name'][:90]}")
EOF
else
  say "7. skipped: no nsys"
fi
}

# 8. The SVD refresh on the device (the authors' code on an H100: 3.35 s at 130M, 10.5 s at 350M).
check8() {
if [[ -x $refresh ]]; then
  say "8. SVD refresh of every projectable matrix (refresh-*.txt):"
  for model in ${REFRESH_MODELS:-130m 350m}; do
    FRUGAL_BENCH_DEVICE=$device FRUGAL_BENCH_MODEL=$model timeout 300 "$refresh" --quick \
      >"$out/refresh-$model.txt" 2>&1
    grep -E "^(exact|randomized)" "$out/refresh-$model.txt" | sed "s/^/   $model /" |
      tee -a "$summary"
  done
else
  say "8. skipped: no refresh benchmark at $refresh"
fi
}
# 9. NCCL with one rank: the collectives, and training as a torchrun-style rank.
check9() {
if [[ -x $nccl_test ]]; then
  if "$nccl_test" --nocapture >"$out/nccl-test.txt" 2>&1; then
    say "9. NCCL collectives, one rank, against a single process: ok (nccl-test.txt)"
  else
    say "9. NCCL collectives, one rank, against a single process: FAILED (nccl-test.txt)"
  fi
else
  say "9. skipped the collectives: no test binary at $nccl_test"
fi
flags=(--steps 20 --eval-every 20 --eval-tokens 4096 --log-every 1 --optimizer frugal --device "$device")
"$bin" train "${flags[@]}" --out "$out/alone" >"$out/alone.log" 2>&1
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
  "$bin" train "${flags[@]}" --out "$out/one-rank" >"$out/one-rank.log" 2>&1
engine=$(grep -o 'data parallel over [A-Za-z ]*' "$out/one-rank.log" || echo "no engine logged")
"$python" - "$out/alone" "$out/one-rank" "$engine" <<'EOF' | tee -a "$summary"
import json, sys
def losses(run):
    return [json.loads(l)["loss"] for l in open(f"{run}/metrics.jsonl") if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
same = len(a) == len(b) == 20 and a == b
print(f"9. tiny frugal, 20 steps, one torchrun-style rank ({sys.argv[3]}) against one process: "
      f"{'identical losses' if same else 'DIFFERENT'}; final {a[-1]:.4f} vs {b[-1]:.4f}")
EOF
}
# 10. Decoding on the GPU: the same greedy text as on the CPU, and its speed.
check10() {
if [[ ! -d $out/tiny-cpu/checkpoints ]]; then
  "$bin" train --steps 20 --eval-every 20 --eval-tokens 4096 --optimizer adamw --device cpu \
    --out "$out/tiny-cpu" >"$out/tiny-cpu.log" 2>&1
fi
local g=(generate --checkpoint "$out/tiny-cpu" --prompt "The whale" --temperature 0 --max-new-tokens 64
  --prompt "Call me Ishmael. Some years ago, never mind how long" --prompt "It was")
"$bin" "${g[@]}" --device cpu >"$out/generate-cpu.txt" 2>"$out/generate-cpu.log"
"$bin" "${g[@]}" --device "$device" >"$out/generate-gpu.txt" 2>"$out/generate-gpu.log"
local model=${big[0]}
"$bin" train --model "$model" --steps 1 --batch-size 1 --seq-len 64 --eval-tokens 64 \
  --device "$device" --out "$out/generate-$model" >"$out/generate-$model-train.log" 2>&1
"$bin" generate --checkpoint "$out/generate-$model" --temperature 0 --max-new-tokens 256 \
  --device "$device" >/dev/null 2>"$out/generate-$model.log"
"$bin" generate --checkpoint "$out/generate-$model" --temperature 0.8 --max-new-tokens 256 \
  --samples 8 --device "$device" >/dev/null 2>"$out/generate-$model-8.log"
"$python" - "$out" "$model" <<'EOF' | tee -a "$summary"
import os, sys
out, model = sys.argv[1], sys.argv[2]
cpu, gpu = (open(os.path.join(out, f"generate-{d}.txt")).read() for d in ("cpu", "gpu"))
common = next((i for i, (a, b) in enumerate(zip(cpu, gpu)) if a != b), min(len(cpu), len(gpu)))
verdict = "identical" if cpu == gpu else f"the same for {common} of {len(cpu)} characters"
last = lambda name: (open(os.path.join(out, name)).read().strip().splitlines() or ["no output"])[-1]
print(f"10. generate, tiny greedy, 3 prompts × 64 tokens: GPU text against CPU: {verdict}; "
      f"{model} on the GPU: {last(f'generate-{model}.log')}; "
      f"{last(f'generate-{model}-8.log')}")
EOF
}
# 11. LoRA on the GPU: against the CPU, and its checkpoint evaluated with the adapters merged.
check11() {
cpu_against_gpu 11 lora lora
"$bin" eval --checkpoint "$out/lora-gpu" --eval-tokens 4096 --device "$device" \
  >"$out/lora-eval.txt" 2>"$out/lora-eval.log"
"$python" - "$out" <<'EOF' | tee -a "$summary"
import json, os, sys
out = sys.argv[1]
trained = [json.loads(l)["val_loss"] for l in open(f"{out}/lora-gpu/metrics.jsonl") if "val_loss" in l]
text = open(os.path.join(out, "lora-eval.txt")).read()
evaluated = float(text.split("loss ")[1].split()[0]) if "loss " in text else float("nan")
last = trained[-1] if trained else float("nan")
verdict = "ok" if abs(evaluated - last) < 1e-3 * abs(last) else "DIFFERENT"
print(f"11. eval of the GPU LoRA checkpoint, adapters merged: loss {evaluated:.4f} against the "
      f"run's last validation loss {last:.4f}: {verdict}")
EOF
}
for check in ${CHECKS:-1 2 3 5 6 7 8 9 10 11}; do
  "check$check"
done
say "done; logs and run directories in $out"
