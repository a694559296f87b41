"""Checks that the installed llama-cpp-python is the portable build and answers a real prompt.

Run by `bash setup.sh --dev` after installing (`python tests/llama_build.py`) and by
tests/test_llama_build.py. Two checks:
- compile-time CPU features (`llama_print_system_info`): AVX2 in, AVX-512 and AMX out. A native
  build on an AVX-512/AMX CPU has them in, and its AMX matmul segfaults on multi-token prompts;
- a multi-token prompt through the embedded SmolLM2 GGUF, in a child process, so that a crash
  becomes an exit code and not a dead test run. A one-token prompt can pass on a broken build.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

AMX_SYMBOL = b"ggml_backend_amx_mul_mat"  # where the native build crashed (gdb)
FORBIDDEN = ("AVX512", "AMX")  # any feature whose name starts with these
REQUIRED = ("AVX2", "FMA", "F16C")
FIX = ("reinstall the portable build: .venv/bin/python -m pip install --no-cache-dir "
       "--force-reinstall --no-deps -r requirements-test.txt")


def compiled_features() -> dict[str, str]:
    """Compile-time CPU features of the installed libggml-cpu, e.g. {'AVX2': '1', ...}."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return dict(re.findall(r"([A-Z0-9_]+) = ([^|\s]+)", info))


def cpu_library() -> Path:
    """The installed libggml-cpu shared library."""
    import llama_cpp

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    if not libs:
        raise FileNotFoundError("llama_cpp/lib has no libggml-cpu*.so")
    return libs[0]


def has_amx_kernel(lib: Path) -> bool:
    """Whether the library exports the AMX matmul (C++ symbols are exported by name, mangled
    around it), which only an AMX-enabled (e.g. native on an AMX Xeon) build compiles."""
    return AMX_SYMBOL in lib.read_bytes()


def feature_problems(features: dict[str, str]) -> list[str]:
    """What makes this build non-portable (empty when it is the portable one)."""
    problems = [f"{name} compiled in" for name, v in features.items()
                if v == "1" and name.startswith(FORBIDDEN)]
    problems += [f"{name} missing" for name in REQUIRED if features.get(name) != "1"]
    return problems


_PROMPT_CHILD = r"""
import llama_cpp
from qprobe.models import default_model_file
llm = llama_cpp.Llama(model_path=str(default_model_file()), n_ctx=256, n_threads=2,
                      verbose=False)
out = llm("The capital of France is a city called", max_tokens=4, temperature=0.0)
print(repr(out["choices"][0]["text"]))
"""


def multi_token_prompt(timeout: float = 300.0) -> tuple[int, str]:
    """Runs a 9-token prompt in a child process: (exit code, last output line)."""
    p = subprocess.run([sys.executable, "-c", _PROMPT_CHILD], capture_output=True, text=True,
                       timeout=timeout)
    lines = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode, lines[-1] if lines else ""


def main() -> int:
    problems = feature_problems(compiled_features())
    if has_amx_kernel(cpu_library()):
        problems.append("AMX kernel present")
    if problems:
        print(f"llama-cpp-python is not the portable build ({', '.join(problems)}); {FIX}",
              file=sys.stderr)
        return 1
    rc, last = multi_token_prompt()
    if rc != 0:
        print(f"llama-cpp-python crashed on a multi-token prompt (exit {rc}: {last}); {FIX}",
              file=sys.stderr)
        return 1
    print(f"llama-cpp-python: portable build, multi-token prompt answered {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
