"""`collect`: a `CollectConfig` made into a task, a model and a `Draw`, run by its executor
(local: `core.collect_task` in this process; ray: `ray.collect_ray` on actors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from qprobe.backends.base import LanguageModel, SamplingParams
from qprobe.collect.config import CollectConfig
from qprobe.collect.core import Draw, collect_task
from qprobe.collect.model import collect_meta, load_collect_model
from qprobe.errors import QProbeError

EXECUTORS = ("local", "ray")


def collect(cfg: CollectConfig, lm: LanguageModel | None = None,
            say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a collection; returns the summary. `lm` may be a loaded LanguageModel
    (used by the local executor only). `say` gets the Ray executor's log lines (default: stderr).

    A preference task (one with `pairs`) has its pairs embedded unless `cfg.pairs` is False."""
    from qprobe.tasks import load_task

    if cfg.executor not in EXECUTORS:
        raise QProbeError(f"collect: --executor must be local or ray, got {cfg.executor!r}")
    task = load_task(cfg.task, cfg.data)
    as_pairs = cfg.pairs and hasattr(task, "pairs")
    k = (0 if as_pairs else 16) if cfg.k is None else cfg.k
    try:
        if k < (0 if as_pairs else 1):
            raise QProbeError(f"collect: --k must be >= {0 if as_pairs else 1}, got {k}")
        splits = task.splits()
        split = cfg.split
        if split is None:
            if len(splits) != 1:
                raise QProbeError(f"collect: task {cfg.task} has splits {', '.join(splits)}; pass --split")
            split = next(iter(splits))
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop=list(task.stop), seed=cfg.seed)
        draw = Draw(k, params if k or not as_pairs else None, pairs=as_pairs)
        if not draw.rows(task, split, cfg.limit):  # before loading a model for nothing
            raise QProbeError(f"collect: task {cfg.task} split {split} has no "
                              + ("pairs" if as_pairs else "prompts"))
        cfg = replace(cfg, k=k)
        settings = {n: v for n, v in asdict(cfg).items() if n != "progress"}
        if cfg.executor == "ray":  # the actors load the model; `lm` is not used
            from qprobe.collect.ray import collect_ray

            return collect_ray(cfg, task, split, draw, settings, say=say)
        if lm is None:
            lm = load_collect_model(cfg)
        return collect_task(
            lm, task, split, cfg.out, k=k, params=draw.params, pairs=as_pairs, limit=cfg.limit,
            batch_prompts=cfg.batch_prompts, progress=cfg.progress,
            meta_extra=collect_meta(cfg, lm), settings=settings,
        )
    finally:
        task.close()
