"""The trainer's configuration, kept free of torch so that `qprobe --help` stays fast.

`qprobe train` turns every field into a flag and `qprobe run` YAML uses the same names; the
`help` metadata is the one description of each hyper-parameter. Defaults are the paper's; see
`qprobe.train` for why they also work on small data. The objectives (names, help, what each
needs) come from the registry in `qprobe.train.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qprobe.errors import QProbeError
from qprobe.train import objectives

BASELINES = ("none", "mean", "prompt")


@dataclass
class TrainConfig:
    """Hyper-parameters of probe training (paper defaults; see qprobe.train for small data)."""

    objective: str = field(default="q", metadata={
        "help": "training objective: " + ", ".join(
            f"{o.name} ({o.help})" for o in objectives.REGISTRY.values()),
        "choices": objectives.names()})
    beta: float = field(default=0.1, metadata={
        "help": "selection temperature stored with the probe; pg and dpo also train with it"})
    lr: float = field(default=5e-5, metadata={"help": "learning rate"})
    batch_size: int = field(default=1000, metadata={
        "help": "rows per batch (pg: batch_size // group_size whole groups; bt/dpo: "
                "batch_size // 2 pairs / whole prompts of about batch_size rows)"})
    epochs: int = field(default=150, metadata={"help": "passes over the training rows"})
    min_steps: int = field(default=10000, metadata={
        "help": "raise epochs until at least this many optimiser steps are taken (small data)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    optimizer: str = field(default="adam", metadata={
        "help": "optimizer", "choices": ("adam", "adamw")})
    group_size: int = field(default=10, metadata={
        "help": "pg: samples of one prompt per softmax group (m; paper: 10)"})
    baseline: str = field(default="none", metadata={
        "help": "pg: reward baseline; constant per group, changes the loss value, not the "
                "gradient", "choices": BASELINES})
    hidden: tuple[int, ...] = field(default=(), metadata={
        "help": "hidden layer sizes of an MLP probe, comma separated (empty: linear probe)"})
    standardize: bool = field(default=True, metadata={
        "help": "standardise features with mean/std of the training rows (stored in the probe)"})
    precision: str = field(default="float16", metadata={
        "help": "linear probes: how the standardised training features are kept. float16 (as "
                "rollouts store them): half the memory and memory traffic, 1.4-1.9x faster on "
                "CPU, 2^-11 relative rounding; arithmetic, weights and optimiser stay float32. "
                "On the MBPP/Qwen probes both give the same test rewards to 3 decimals. MLP "
                "probes always train in float32",
        "choices": ("float16", "float32")})
    threads: int = field(default=0, metadata={
        "help": "linear probes: threads for the training step (0: 2 on a machine with 2 or more "
                "cores when the data are large, else 1); the trained probe is the same for any "
                "value"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, split and order"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "fraction of prompts held out for validation (0: none)"})
    patience: int = field(default=0, metadata={
        "help": "early stopping: epochs without validation improvement (0: never stop early; "
                "the best validation epoch is kept whenever there is a validation split)"})

    def validate(self) -> None:
        """Raise QProbeError on a value the user must fix."""
        known = objectives.names()
        obj = objectives.REGISTRY.get(self.objective)
        checks = [
            (obj is not None, f"objective must be one of {known}"),
            (self.optimizer in ("adam", "adamw"), "optimizer must be adam or adamw"),
            (self.precision in ("float32", "float16"), "precision must be float32 or float16"),
            (self.baseline in BASELINES, f"baseline must be one of {BASELINES}"),
            (math.isfinite(self.beta) and self.beta >= 0, "beta must be >= 0"),
            (self.beta > 0 or obj is None or not obj.uses_beta,
             f"beta must be > 0 to train {self.objective} (softmax(Q/beta))"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.min_steps >= 0, "min_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.group_size >= 2, "group_size must be >= 2"),
            (all(int(h) > 0 for h in self.hidden), "hidden sizes must be positive"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.patience >= 0, "patience must be >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise QProbeError(f"train config: {msg}")
