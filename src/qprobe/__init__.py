"""qprobe: Q-probes for frozen language models (Li et al., 2024, arXiv 2402.14688).

The top-level names are imported lazily, so `import qprobe` (and `qprobe --help`) stays fast and
does not load torch or transformers until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "Probe": "qprobe.probe",
    "TrainConfig": "qprobe.train.config",
    "train_probe": "qprobe.train",
    "Rollouts": "qprobe.rollouts",
    "RolloutWriter": "qprobe.rollouts",
    "write_rollouts": "qprobe.rollouts",
    "load_model": "qprobe.backends",
    "load_embedder": "qprobe.backends",
    "SamplingParams": "qprobe.backends.base",
    "CollectConfig": "qprobe.collect",
    "get_task": "qprobe.tasks",
    "list_tasks": "qprobe.tasks",
    "Sandbox": "qprobe.sandbox",
    "SandboxConfig": "qprobe.sandbox",
    "QProbePolicy": "qprobe.policy",
    "best_of_k": "qprobe.policy",
    "evaluate_rollouts": "qprobe.evaluate",
    "run_experiment": "qprobe.experiment",
    "load_config": "qprobe.experiment",
}

__all__ = ["FeatureSpec", "FeatureSpecMismatch", "QProbeError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value
