#!/usr/bin/env bash
# The data-parallel tests: collectives and training with two ranks under mpirun (after
# scripts/setup-mpi.sh). Open MPI refuses root unless told; two ranks may share fewer cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test -p frugal-dist -p frugal-cli --features mpi --test mpi --test distributed
