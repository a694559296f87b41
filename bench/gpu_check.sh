#!/usr/bin/env bash
# The GPU check: collect / train / generate / serve on CUDA with the embedded SmolLM2-135M,
# rows compared with a CPU run of the same seed, tokens/s side by side (bench/gpu_check.py says
# what is checked and with which tolerances). Under 5 minutes on one GPU.
#
#   bash bench/gpu_check.sh [--keep] [--out DIR] [...]     (flags: python bench/gpu_check.py -h)
#
# Exit 0: passed; 1: a check failed (one line says which); 3: no CUDA device, nothing run.
# Python: $PYTHON, else the checkout's .venv, else python3; it runs this checkout's src/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$root/bench/gpu_check.py" "$@"
