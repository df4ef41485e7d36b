#!/usr/bin/env bash
# Every benchmark, one after another, each writing its JSON to benchmarks/results/. Run it on a quiet machine:
# a second process on the same cores invalidates every timing (each JSON records the load average it saw).
#   bash benchmarks/run_all.sh            # the CPU set (~30 min on 2 cores); gpu_step.py too when a GPU is visible
#   RCDM_BENCH_CONVERGENCE=1 bash benchmarks/run_all.sh   # also convergence.py and time_to_shape.py's baseline and bf16 arms (hours)
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "== $*"; /usr/bin/time -f "   %e s" python "$@"; }
run benchmarks/unet_forward.py
run benchmarks/training.py
run benchmarks/side_by_side.py
run benchmarks/shard_throughput.py
run benchmarks/sampling.py --images 32
run benchmarks/scale.py
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    run benchmarks/gpu_step.py
fi
if [ "${RCDM_BENCH_CONVERGENCE:-0}" = 1 ]; then
    run benchmarks/convergence.py
    run benchmarks/time_to_shape.py --arms baseline,bf16
fi
