"""Which backend serves a model: an explicit key, else the form of the model name.

One table, `BACKENDS`, names every backend with the module that implements it; a module is
imported only when its backend is used (`import qprobe` stays free of torch). Callers ask
`resolve` what a name maps to instead of looking at the name themselves:

    "hf"      a local transformers model: 'default' (the embedded SmolLM2), 'qwen2.5-coder-0.5b',
              a .gguf file, a transformers folder or a hub id; computes its own features.
    "openai"  an OpenAI-compatible server at an http(s):// URL; returns text, so features come
              from an `Embedder` (a local model, or the server's /v1/embeddings).
    "adapter" the policy of an adapter folder (`qprobe adapt`) on the base model it was trained
              on (`qprobe collect --adapter DIR`); never chosen from the name.

A key names a module by string, so a lower floor (collection, serving) can load a model that a
higher one implements (adapters/) without importing it.

To add a backend: a module with `load_model(name_or_path, **kw) -> LanguageModel`, one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from qprobe.backends.base import Embedder, LanguageModel
from qprobe.errors import QProbeError


@dataclass(frozen=True)
class BackendInfo:
    """One backend. own_features: it computes features itself, so the local options (layer,
    position, chat, device, dtype) apply; otherwise it returns text and takes an `embedder`."""

    key: str
    module: str
    own_features: bool
    help: str

    def load(self, name_or_path: str | None, **kw: Any) -> LanguageModel:
        return importlib.import_module(self.module).load_model(name_or_path, **kw)


BACKENDS: dict[str, BackendInfo] = {
    "hf": BackendInfo("hf", "qprobe.backends.hf", True,
                      "a local transformers model: 'default', 'qwen2.5-coder-0.5b', a .gguf "
                      "file, a folder or a hub id"),
    "openai": BackendInfo("openai", "qprobe.backends.openai", False,
                          "an OpenAI-compatible server (/v1/completions or /v1/chat/completions)"),
    "adapter": BackendInfo("adapter", "qprobe.adapters.policy", True,
                           "the policy of an adapter folder (`qprobe adapt`) on its base model"),
}

URL_PREFIXES = ("http://", "https://")  # a model named by a URL is served by "openai"


def resolve(name_or_path: str | None, backend: str | None = None) -> BackendInfo:
    """The backend for a model: `backend` when given, "openai" for an http(s):// URL, else "hf"."""
    if backend is not None:
        if backend not in BACKENDS:
            raise QProbeError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        return BACKENDS[backend]
    if name_or_path is not None and str(name_or_path).startswith(URL_PREFIXES):
        return BACKENDS["openai"]
    return BACKENDS["hf"]


def load_model(name_or_path: str | None = None, *, backend: str | None = None,
               layer: int | None = None, position: str = "last", device: str | None = None,
               dtype: Any = None, chat: bool | None = None, **kw: Any) -> LanguageModel:
    """Load a sampling backend (see `resolve`). layer/position/device/dtype/chat configure a
    backend with its own features (ignored by the others); other keywords go to the backend
    (local: features=False, feature_dtype, max_batch_rows (default: by model width); OpenAI:
    `OpenAIConfig` fields and `embedder`)."""
    info = resolve(name_or_path, backend)
    if info.own_features:
        kw.update(layer=layer, position=position, device=device, dtype=dtype, chat=chat)
    return info.load(name_or_path, **kw)


def load_embedder(name_or_path: str | None = None, *, layer: int | None = None,
                  position: str = "last", device: str | None = None, dtype: Any = None,
                  chat: bool | None = None, **kw: Any) -> Embedder:
    """Load a local model as an `Embedder` (features of given prompt/completion text)."""
    from qprobe.backends.hf import load_embedder as load

    return load(name_or_path, layer=layer, position=position, device=device, dtype=dtype,
                chat=chat, **kw)
