#!/usr/bin/env bash
# The gradient and parameter exchange of a data-parallel step, per collective, with N ranks
# under mpirun (after scripts/setup-mpi.sh): all-reduce against reduce to the owning rank.
#   scripts/bench-collectives.sh [RANKS] [--quick]   (default: 2 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
shift || true
# Build once; cargo's JSON messages name the benchmark's executable.
bin=$(cargo bench -p frugal-dist --features mpi --bench collectives --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable"):
        print(m["executable"])')
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun -np "$ranks" --oversubscribe "$bin" "$@"
