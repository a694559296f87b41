"""Collection: k completions per prompt (or a preference task's pairs), their features and
rewards, into a rollouts folder. One loop, several executors:

    config.py   CollectConfig (every `qprobe collect` flag) and RayConfig (the Ray knobs)
    core.py     the one loop: plan -> sample (or embed pairs) -> score -> append a shard
    model.py    the model a config names, by backend key
    run.py      `collect(cfg)`: config -> task, model, draw; the chosen executor
    ray.py      `--executor ray`: the same batches on Ray actors (Ray imported lazily)
"""

from __future__ import annotations

import importlib
from typing import Any

from qprobe.collect.config import CollectConfig, RayConfig

# The loop's modules load on first use, so `qprobe --help` (which reads CollectConfig for the
# flags) does not import numpy and the rest of the collection stack.
_LAZY = {"Draw": "core", "collect_task": "core", "plan": "core", "rollouts_meta": "core",
         "collect_meta": "model", "load_collect_model": "model", "collect": "run"}

__all__ = ["CollectConfig", "Draw", "RayConfig", "collect", "collect_meta", "collect_task",
           "load_collect_model", "plan", "rollouts_meta"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"qprobe.collect.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qprobe.collect' has no attribute {name!r}")
