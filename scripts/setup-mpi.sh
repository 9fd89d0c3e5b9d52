#!/usr/bin/env bash
# Installs what data-parallel training needs (Debian/Ubuntu): Open MPI and the libclang that the
# `mpi` crate's bindings are generated with. Then:
#   cargo build --release -p frugal-cli --features mpi
#   mpirun -np 2 target/release/frugal train --batch-size 4
set -euo pipefail
packages=(libopenmpi-dev openmpi-bin libclang-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "MPI packages present: ${packages[*]}"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
