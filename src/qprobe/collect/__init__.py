"""Collection: k completions per prompt (or a preference task's pairs), their features and
rewards, into a rollouts folder. One loop, several executors:

    config.py   CollectConfig (every `qprobe collect` flag) and RayConfig (the Ray knobs)
    core.py     the one loop: plan -> sample (or embed pairs) -> score -> append a shard
    model.py    the model a config names, by backend key
    run.py      `collect(cfg)`: config -> task, model, draw; the chosen executor
    ray.py      `--executor ray`: the same batches on Ray actors (Ray imported lazily)
"""

from __future__ import annotations

from qprobe.collect.config import CollectConfig, RayConfig
from qprobe.collect.core import Draw, collect_task, plan, rollouts_meta
from qprobe.collect.model import collect_meta, load_collect_model
from qprobe.collect.run import collect

__all__ = ["CollectConfig", "Draw", "RayConfig", "collect", "collect_meta", "collect_task",
           "load_collect_model", "plan", "rollouts_meta"]
