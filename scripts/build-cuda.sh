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
#   scripts/build-cuda.sh --checks   # also the GPU test and benchmark binaries that
#                                    # scripts/gpu-check.sh runs, packed with the binary into
#                                    # target/cuda/gpu-check.tar.xz (to carry to a GPU machine)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

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
    if [[ ! -e $CUDA_HOME/lib/stubs/libcuda.so ]]; then
        # The driver API functions cudarc declares, each a stub, for linking only.
        cargo fetch --quiet
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
        mkdir -p "$CUDA_HOME/lib/stubs"
        grep -o '\bcu[A-Z][A-Za-z0-9_]*\s*(' "$sys" | tr -d ' (' | sort -u |
            sed 's/.*/int &(void) { return 999; }/' >"$CUDA_HOME/lib/stubs/cuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" \
            "$CUDA_HOME/lib/stubs/cuda_stub.c"
        # With the stubs on LD_LIBRARY_PATH the binary starts here and reports no GPU.
        ln -sf libcuda.so "$CUDA_HOME/lib/stubs/libcuda.so.1"
    fi
    export LIBRARY_PATH=$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
fi

export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
runpath='$ORIGIN:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib'
runpath+=':/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda-13.0/lib64'
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$runpath"
cargo build --release -p frugal-cli --features cuda --target-dir target/cuda
echo "built target/cuda/release/frugal (compute capability $CUDA_COMPUTE_CAP)"
if [[ ${1:-} == --checks ]]; then
    # The path of the executable cargo builds for `$@` (--no-run).
    executable() {
        cargo "$@" --features cuda --target-dir target/cuda --no-run \
            --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable"):
        print(m["executable"])'
    }
    pack=target/cuda/gpu-check
    rm -rf "$pack" && mkdir -p "$pack"
    # Stripped (the kernels' PTX stays), then compressed: a GPU machine may take few bytes.
    strip -o "$pack/frugal-cuda-test" "$(executable test -p frugal --release --test cuda)"
    strip -o "$pack/step-bench" "$(executable bench -p frugal --bench step)"
    strip -o "$pack/refresh-bench" "$(executable bench -p frugal-train --bench refresh)"
    strip -o "$pack/frugal" target/cuda/release/frugal
    XZ_OPT=-T0 tar -cJf target/cuda/gpu-check.tar.xz -C target/cuda gpu-check
    ls -l target/cuda/gpu-check.tar.xz
fi
