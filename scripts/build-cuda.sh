#!/usr/bin/env bash
# Builds the CUDA binary: target/cuda/release/frugal (cargo feature `cuda`).
#
# Where a CUDA toolkit is installed (nvcc on PATH, or CUDA_HOME set), it is used. Otherwise the
# pinned 13.0 toolkit is installed from PyPI wheels into .cuda-toolkit/ (unzipped, no pip
# install), with a stub of the driver library for linking only: at run time the GPU machine's
# own driver (libcuda.so.1) is loaded. The binary carries a RUNPATH to the usual CUDA library
# folders, so it runs there without LD_LIBRARY_PATH.
#
#   scripts/build-cuda.sh            # compute capability 9.0 (H100, H200)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # A100
#   scripts/build-cuda.sh --nccl     # with data parallelism across GPUs (cargo feature
#                                    # `nccl`): the binary then needs NCCL's libnccl.so.2 at run
#                                    # time (Debian's libnccl2, or the nvidia-nccl-cu13 wheel's
#                                    # folder on LD_LIBRARY_PATH); add `mpirun` launches with
#                                    # FEATURES=mpi (after scripts/setup-mpi.sh)
#   scripts/build-cuda.sh --checks   # also the GPU test and benchmark binaries that
#                                    # scripts/gpu-check.sh runs, packed with the binary into
#                                    # target/cuda/gpu-check.tar.xz (to carry to a GPU machine);
#                                    # implies --nccl
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
features=cuda
checks=
for arg in "$@"; do
    case $arg in
        --nccl) features=nccl ;;
        --checks) features=nccl checks=1 ;;
        *) echo "unknown option $arg: use --nccl or --checks" >&2; exit 2 ;;
    esac
done
[[ -n ${FEATURES:-} ]] && features+=",$FEATURES"

if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME=$root/.cuda-toolkit/cuda
    if [[ ! -x $CUDA_HOME/bin/nvcc ]]; then
        echo "installing the CUDA 13.0 toolkit from PyPI wheels into .cuda-toolkit/"
        work=$root/.cuda-toolkit
        rm -rf "$work/wheels" "$work/unz" "$CUDA_HOME"
        mkdir -p "$work/wheels" "$work/unz"
        # nvcc 13.1+ emits PTX that the 580 driver line rejects: stay on 13.0.
        python3 -m pip download --quiet --no-deps -d "$work/wheels" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
            nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
        for w in "$work"/wheels/*.whl; do
            python3 -m zipfile -e "$w" "$work/unz"
        done
        mv "$work/unz/nvidia/cu13" "$CUDA_HOME"
        rm -rf "$work/unz" "$work/wheels"
        chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
        ln -s lib "$CUDA_HOME/lib64"
        (cd "$CUDA_HOME/lib" && for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 \
            libcurand.so.10 libnvrtc.so.13 libnvvm.so.4; do ln -sf "$f" "${f%%.so*}.so"; done)
    fi
    # The functions cudarc declares for the driver (libcuda) and NCCL (libnccl), each a stub,
    # for linking only: the GPU machine's own libraries are loaded at run time.
    stub() { # library soname cudarc-module prefix
        [[ -e $CUDA_HOME/lib/stubs/$1.so ]] && return
        cargo fetch --quiet
        local sys
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/$3/sys/mod.rs | tail -1)
        mkdir -p "$CUDA_HOME/lib/stubs"
        grep -o "\\b$4[A-Z][A-Za-z0-9_]*\\s*(" "$sys" | tr -d ' (' | sort -u |
            sed 's/.*/int &(void) { return 999; }/' >"$CUDA_HOME/lib/stubs/$1_stub.c"
        cc -shared -fPIC -Wl,-soname,$2 -o "$CUDA_HOME/lib/stubs/$1.so" \
            "$CUDA_HOME/lib/stubs/$1_stub.c"
        # With the stubs on LD_LIBRARY_PATH the binary starts here and reports no GPU.
        ln -sf "$1.so" "$CUDA_HOME/lib/stubs/$2"
    }
    stub libcuda libcuda.so.1 driver cu
    [[ $features == *nccl* ]] && stub libnccl libnccl.so.2 nccl nccl
    export LIBRARY_PATH=$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
fi

export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
runpath='$ORIGIN:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib'
runpath+=':/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda-13.0/lib64'
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$runpath"
cargo build --release -p frugal-cli --features "$features" --target-dir target/cuda
echo "built target/cuda/release/frugal (features $features; compute capability $CUDA_COMPUTE_CAP)"
if [[ -n $checks ]]; then
    # The path of the executable cargo builds for `$@` (--no-run).
    executable() {
        cargo "$@" --target-dir target/cuda --no-run \
            --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable"):
        print(m["executable"])'
    }
    # The test and benchmark binaries use candle-core with NCCL, as the binary does.
    same=cuda,candle-core/nccl
    pack=target/cuda/gpu-check
    rm -rf "$pack" && mkdir -p "$pack"
    # Stripped (the kernels' PTX stays), then compressed: a GPU machine may take few bytes.
    strip -o "$pack/frugal-cuda-test" "$(executable test -p frugal --features "$same" --release --test cuda)"
    strip -o "$pack/step-bench" "$(executable bench -p frugal --features "$same" --bench step)"
    strip -o "$pack/refresh-bench" "$(executable bench -p frugal-train --features "$same" --bench refresh)"
    strip -o "$pack/nccl-test" "$(executable test -p frugal-dist --release --features nccl --test nccl)"
    strip -o "$pack/frugal" target/cuda/release/frugal
    XZ_OPT=-T0 tar -cJf target/cuda/gpu-check.tar.xz -C target/cuda gpu-check
    ls -l target/cuda/gpu-check.tar.xz
fi
