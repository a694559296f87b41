#!/bin/sh
# Model-written tests for the mbpp-qwen-coder rollouts, then CodeT's runs of them (resumable:
# rerun to continue). Test sets first (their first 40 prompts, run at once, then the rest), then
# train. PY: the python of the virtualenv (default .venv/bin/python).
cd "$(dirname "$0")/../.." || exit 1
PY=${PY:-.venv/bin/python}
R=results/mbpp-qwen-coder/rollouts
Q="env PYTHONPATH=src nice -n 10 $PY -m qprobe signals"
M="--model qwen2.5-coder-0.5b"
$Q $R/mbpp-test --task mbpp --gen-tests $M --limit 40 &&
$Q $R/humaneval --task humaneval --gen-tests $M --limit 40 &&
$Q $R/mbpp-test --task mbpp --gen-exec &&
$Q $R/humaneval --task humaneval --gen-exec &&
$Q $R/mbpp-test --task mbpp --gen-tests $M &&
$Q $R/humaneval --task humaneval --gen-tests $M &&
$Q $R/mbpp-test --task mbpp --gen-exec &&
$Q $R/humaneval --task humaneval --gen-exec &&
$Q $R/train --task mbpp --gen-tests $M &&
$Q $R/train --task mbpp --gen-exec
