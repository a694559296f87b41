"""Training a Q-probe on (features, rewards) or (features, preference pairs).

    config.py      TrainConfig: the hyper-parameters (torch-free: `qprobe --help` reads it)
    objectives.py  the registry: one entry per objective (layout, loss, closed-form gradient,
                   its code in linfit.c)
    data.py        the layouts (batches of rows in the order an objective needs), feature
                   statistics, the standardised training matrix, arrays from a rollouts folder
    threads.py     how many threads the setup passes, the step and torch use
    loop.py        train_probe: inputs -> validation split -> layout -> epochs -> Probe
    engines/       the steps: native.py (+ linfit.c, a linear probe's epochs in C), torch_step.py
                   (the same fused step in torch, and autograd for everything else)

The trainer is written for CPU speed: the training rows are laid out once, standardised, as one
float16 (default) or float32 (`precision`) matrix in the order the objective needs (q/ce: shuffled
rows; pg: groups of m samples of one prompt; bt: chosen/rejected row pairs; dpo: whole prompts),
and every batch is a contiguous slice of it. A linear probe trains with a fused step that reads
each batch once, in cache-sized blocks of whole units (engines/torch_step.py); its epochs run in
C (engines/linfit.c) where that can be built, else with torch operations. Each epoch visits the
batches in a new random order. Re-shuffling rows every epoch would mean gathering the whole matrix
again, which costs more than the training step itself on a CPU; the batch composition therefore
stays fixed for a run (drawn from the seed).

Small data. The paper's defaults (Adam, lr 5e-5, batch 1000, 150 epochs) were tuned for 92,800
rows, i.e. ~14,000 optimiser steps. On 100 prompts x 16 samples the same 150 epochs are only
300 steps. Three choices make the defaults work there too:
- features are standardised (fitted on the training rows, stored in the probe), so that Adam's
  per-coordinate step of ~lr moves every score by a comparable amount whatever the feature scale;
- the output layer starts at zero (the policy starts as the base model's own sampling) and for
  q/ce the bias starts at the loss-optimal constant (mean reward / its logit), so no steps are
  spent learning the average;
- `min_steps` (default 10,000) raises the number of epochs until at least that many optimiser
  steps are taken. With a validation split, early stopping keeps the best epoch.

The names below are imported on first use, so that `qprobe.train.config` can be read without
loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "qprobe.train.config",
    "train_probe": "qprobe.train.loop",
    "arrays_from_rollouts": "qprobe.train.data",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qprobe.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value
