"""The model a `CollectConfig` names, loaded by backend key (hf, openai, or adapter for
`--adapter`: collection never imports the adapters package), and the meta keys it adds."""

from __future__ import annotations

from typing import Any

from qprobe.backends.base import LanguageModel
from qprobe.collect.config import CollectConfig
from qprobe.errors import QProbeError


def load_collect_model(cfg: CollectConfig) -> LanguageModel:
    """The model `cfg` names: a backend with its own features gets the feature options; one that
    returns text gets `cfg.embedder` ("server", or a local model loaded as an Embedder)."""
    from qprobe.backends import load_embedder, load_model, resolve

    rows = cfg.batch_prompts * max(1, cfg.k or 16) if cfg.batch_prompts else None
    if cfg.adapter:
        if cfg.dtype:
            raise QProbeError("collect: --dtype applies to a local --model, not to --adapter")
        return load_model(cfg.adapter, backend="adapter", layer=cfg.layer, position=cfg.position,
                          device=cfg.device, chat=cfg.chat, feature_dtype=cfg.feature_dtype,
                          max_batch_rows=rows)
    if resolve(cfg.model, cfg.backend).own_features:
        if cfg.embedder:
            raise QProbeError("collect: --embedder is for API models; a local model computes "
                              "its own features")
        return load_model(cfg.model, backend=cfg.backend, layer=cfg.layer, position=cfg.position,
                          device=cfg.device, dtype=cfg.dtype, chat=cfg.chat,
                          feature_dtype=cfg.feature_dtype, max_batch_rows=rows)
    emb = cfg.embedder
    if cfg.dtype and emb in (None, "server"):
        raise QProbeError("collect: --dtype applies to a local --model or --embedder; this "
                          "model is an API server")
    if emb and emb != "server":
        # The server gets the raw prompt (/v1/completions): no chat template by default.
        emb = load_embedder(emb, layer=cfg.layer, position=cfg.position, device=cfg.device,
                            dtype=cfg.dtype, chat=bool(cfg.chat), feature_dtype=cfg.feature_dtype)
    return load_model(cfg.model, backend=cfg.backend, embedder=emb)


def collect_meta(cfg: CollectConfig, lm: LanguageModel) -> dict[str, Any]:
    """meta.json keys beyond the draw's: the task as the user named it (a path stays as typed),
    how prompts were sent and the backend class."""
    return {"task": cfg.task, "chat": bool(lm.chat), "backend": type(lm).__name__}
