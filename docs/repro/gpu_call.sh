#!/bin/bash
# The GPU evidence (issue 23) in one prepared device call, on the versions CI pins.
#   here, once:   bash docs/repro/gpu_call.sh wheels
#                 (the CI-pinned transformers wheel for the device's Python 3.12, into .whl/, git-ignored;
#                  the device image has torch but an older transformers, and no network)
#   the device:   run(command="bash docs/repro/gpu_call.sh", carry=[".whl"], timeout_s=540)
#                 extra arguments go to bench.py, e.g. a rerun of one shape: ... gpu_call.sh --shapes olmo-7b
#   no GPU:       bash docs/repro/gpu_call.sh --dry   (the wheel check and the versions a call would run)
# Without the pinned wheel in .whl/ it refuses in one line (exit 2) rather than run the device's transformers.
# Writes $OUT/versions.txt, $OUT/report.txt (the log and the table) and $OUT/bench-gpu.json, which the
# report rewrites after every section: a call stopped at its limit still brings back what ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = wheels ]; then
  pin=$(grep '^transformers==' .ci/constraints.txt) || { echo "no transformers pin in .ci/constraints.txt" >&2; exit 1; }
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
fi
# The pinned wheel or nothing: without it the device's own, older transformers would run, unnoticed.
want=$(sed -n 's/^transformers==//p' .ci/constraints.txt)
wheel=$(compgen -G ".whl/transformers-$want-*.whl" | head -n1)
if [ -z "$want" ] || [ -z "$wheel" ]; then
  echo "error: gpu_call.sh: no .whl/transformers-${want:-?}-*.whl (the transformers .ci/constraints.txt pins): run 'bash docs/repro/gpu_call.sh wheels' here and carry .whl" >&2
  exit 2
fi
if [ "${1:-}" = --dry ]; then  # what a call would run, without a GPU: the checks above and the versions
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, end=' ')"
  echo "transformers $want ($wheel)"; exit 0
fi
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
  || { echo "error: gpu_call.sh: pip could not install $wheel" >&2; exit 2; }
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
got=$(python3 -c "import transformers; print(transformers.__version__)")
[ "$got" = "$want" ] || { echo "error: gpu_call.sh: transformers $got imported, $want pinned" >&2; exit 2; }
# SIGINT, not SIGTERM: Python stops as on Ctrl-C, after the last section's bench-gpu.json was written
timeout -s INT 480 python3 bench.py --gpu-report --out "$OUT/bench-gpu.json" "$@" 2>&1 | tee "$OUT/report.txt"
