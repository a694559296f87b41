"""The local backend: a transformers causal LM sampled by qprobe's own decode loop.

    model.py    loading, `HFLanguageModel` (the `LanguageModel`), `HFEmbedder` (features of text)
    loop.py     the k-sample decode loop (`run_batch`) and its per-step seam (`StepHook`)
    sampling.py per-row random streams, temperature + top-p, token log-probabilities
    llama.py    `FastDecoder`: qprobe's own forward for Llama-family models (shared prompt cache)
    generic.py  `GenericDecoder`: any other architecture through transformers' forward
"""

from __future__ import annotations

from typing import Any

from qprobe.backends.hf.loop import LiveRows, StepHook
from qprobe.backends.hf.model import (
    HFEmbedder,
    HFLanguageModel,
    default_batch_rows,
    default_layer,
    load_hf,
    resolve_layer,
)

__all__ = ["HFEmbedder", "HFLanguageModel", "LiveRows", "StepHook", "default_batch_rows",
           "default_layer", "load_embedder", "load_hf", "load_model", "resolve_layer"]


def load_model(name_or_path: str | None = None, *, device: str | None = None, dtype: Any = None,
               **kw: Any) -> HFLanguageModel:
    """Load a local model for sampling (keywords: those of `HFLanguageModel`)."""
    model, tok, identity = load_hf(name_or_path, device=device, dtype=dtype)
    return HFLanguageModel(model, tok, identity=identity, **kw)


def load_embedder(name_or_path: str | None = None, *, device: str | None = None, dtype: Any = None,
                  **kw: Any) -> HFEmbedder:
    """Load a local model as an `Embedder` (keywords: those of `HFEmbedder`)."""
    model, tok, identity = load_hf(name_or_path, device=device, dtype=dtype)
    return HFEmbedder(model, tok, identity=identity, **kw)
