#!/usr/bin/env bash
# Installs what data-parallel training needs (Debian/Ubuntu): Open MPI and the libclang that the
# `mpi` crate's bindings are generated with. Then:
#   cargo build --release -p frugal-cli --features mpi
#   mpirun -np 2 target/release/frugal train --batch-size 4
set -euo pipefail
exec "$(dirname "$0")/apt-install.sh" libopenmpi-dev openmpi-bin libclang-dev
