#!/usr/bin/env bash
# The gradient and parameter exchange of a data-parallel step, per collective, with N ranks
# under mpirun (after scripts/setup-mpi.sh): all-reduce against reduce to the owning rank.
#   scripts/bench-collectives.sh [RANKS] [--quick]   (default: 2 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
shift || true
cargo bench -p frugal-dist --features mpi --bench collectives --no-run
bin=$(cargo bench -p frugal-dist --features mpi --bench collectives --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "collectives" and m.get("executable"):
        print(m["executable"])')
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun -np "$ranks" --oversubscribe "$bin" "$@"
