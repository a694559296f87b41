"""train_probe: check the inputs, split off validation prompts, lay the rows out, run the epochs
with the engine the objective allows, and return the probe with its training record.

Engines, fastest first (the first one the probe and the objective's registry entry allow):
linfit.c (engines/native.py: a linear probe, an objective with a C code), the fused torch step
(engines/torch_step.py: a linear probe, an objective with a closed-form gradient), autograd (any
probe, any differentiable loss). All three visit the same batches in the same order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import torch

from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.probe import Probe, fingerprint
from qprobe.train import data, objectives, threads
from qprobe.train.config import TrainConfig
from qprobe.train.data import Batch
from qprobe.train.engines import native, torch_step
from qprobe.train.objectives import Objective

__all__ = ["TrainConfig", "train_probe"]


class Engine(Protocol):
    """Takes a run's optimiser steps: `run(batch order) -> summed loss`, then `close()`."""

    def run(self, order: np.ndarray) -> float: ...

    def close(self) -> None: ...


def _check_inputs(cfg: TrainConfig, obj: Objective, features: Any, rewards: Any, groups: Any,
                  pairs: Any, say: Callable[[str], None]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int]:
    """One-line QProbeErrors for inputs that cannot train `obj`. Returns (rewards [N] float32
    with NaN = unscored, groups [N] int64, pairs [P, 2] int64 or None, the usable rows, how many
    unscored rows were dropped)."""
    if getattr(features, "ndim", 0) != 2 or len(features) == 0:
        raise QProbeError(f"train: features must be a non-empty [N, D] array, got "
                          f"{getattr(features, 'shape', None)}")
    n = len(features)
    groups = np.arange(n) if groups is None else groups
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,):
        raise QProbeError(f"train: groups must have shape [{n}], got {groups.shape}")
    r = np.full(n, np.nan, np.float32) if rewards is None else np.asarray(rewards, np.float32)
    if r.shape != (n,):
        raise QProbeError(f"train: rewards must have shape [{n}], got {r.shape}")
    dropped = 0
    if obj.pairs:
        if pairs is None or len(pairs) == 0:
            raise QProbeError(f"train: objective {obj.name} needs preference pairs "
                              "(pairs.parquet)")
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if pairs.min() < 0 or pairs.max() >= n:
            raise QProbeError("train: pair row index out of range")
        if (groups[pairs[:, 0]] != groups[pairs[:, 1]]).any():
            raise QProbeError("train: a preference pair mixes two prompts")
        if (pairs[:, 0] == pairs[:, 1]).any():
            raise QProbeError("train: a preference pair has the same sample as chosen and rejected")
        usable = np.ones(n, dtype=bool)
    else:
        usable = np.isfinite(r)
        dropped = int(n - usable.sum())
        if dropped:
            say(f"warning: dropped {dropped} of {n} rows with no reward")
        if not usable.any():
            raise QProbeError(f"train: no rows with a reward; {obj.name} needs rewards")
        if obj.reward_range is not None:
            lo, hi = obj.reward_range
            if ((r[usable] < lo) | (r[usable] > hi)).any():
                raise QProbeError(f"train: {obj.name} needs rewards in [{lo:g}, {hi:g}]; use "
                                  "--objective q or pg")
    return r, groups, pairs, np.flatnonzero(usable), dropped


def _engine_kind(cfg: TrainConfig, obj: Objective) -> str:
    """Which engine trains this probe: "native", "fused" (the torch step) or "autograd"."""
    if cfg.hidden:
        return "autograd"
    if native.for_objective(obj) is not None:
        return "native"
    return "fused" if obj.grad is not None else "autograd"


def _engine(kind: str, cfg: TrainConfig, obj: Objective, net: torch.nn.Sequential,
            x: torch.Tensor, batches: list[Batch], n_threads: int) -> Engine:
    if kind == "native":
        return native.LinearFit(native.library(), cfg, obj, x, batches, net[0], n_threads)
    if kind == "fused":
        return torch_step.TorchLinear(cfg, net, x, batches, n_threads)
    return torch_step.Autograd(cfg, net, x, batches)


def _describe(kind: str, cfg: TrainConfig, obj: Objective, x: torch.Tensor, n_threads: int
              ) -> str:
    """The engine, for the log line."""
    rows_of = str(x.dtype).removeprefix("torch.")
    if cfg.hidden:
        return "MLP, autograd"
    if kind == "native":
        return f"{rows_of} rows, C step on {n_threads} thread(s)"
    if kind == "autograd":
        return f"{rows_of} rows, autograd ({obj.name} has no closed-form gradient)"
    why = native.why_not or "off"
    if native.library() is not None and native.ENABLED:
        why = f"no C path for {obj.name}"
    return f"{rows_of} rows, torch step on {n_threads} thread(s) (C step: {why})"


@torch.no_grad()
def _val_metric(cfg: TrainConfig, obj: Objective, net: torch.nn.Module, x: torch.Tensor,
                b: Batch) -> tuple[str, float, bool]:
    """(name, value, higher_is_better) of the validation set laid out as one batch."""
    scores = net(x[b.start:b.end]).squeeze(-1)  # [B]
    if obj.validate is not None:
        return obj.validate(cfg, scores, b)
    return "val_loss", float(obj.loss(cfg, scores, b)), False


def _epochs(cfg: TrainConfig, obj: Objective, net: torch.nn.Module, engine: Engine,
            steps_per_epoch: int, val: tuple[torch.Tensor, Batch] | None,
            rng: np.random.Generator, epochs: int, say: Callable[[str], None]
            ) -> tuple[dict[str, Any], tuple[Any, float, int]]:
    """Epochs of `engine.run(batch order) -> summed loss`, with validation and early stopping.
    Returns (history, (best state or None, its value with 'higher is better' sign, epoch))."""
    history: dict[str, Any] = {"epoch": [], "loss": [], "val": [], "val_name": ""}
    best = (None, -math.inf, 0)
    bad = 0
    every = max(1, epochs // 10)
    val_name = ""
    for ep in range(1, epochs + 1):
        ep_loss = engine.run(rng.permutation(steps_per_epoch)) / steps_per_epoch
        if not math.isfinite(ep_loss):
            raise QProbeError(f"train: loss became {ep_loss} at epoch {ep}; lower --lr")
        history["epoch"].append(ep)
        history["loss"].append(ep_loss)
        line = f"epoch {ep}/{epochs} loss {ep_loss:.4f}"
        if val is not None:
            val_name, v, higher = _val_metric(cfg, obj, net, *val)
            history["val"].append(v)
            signed = v if higher else -v
            if signed > best[1]:
                best = ({k: t.detach().clone() for k, t in net.state_dict().items()}, signed, ep)
                bad = 0
            else:
                bad += 1
            line += f" {val_name} {v:.4f}" + (" *" if best[2] == ep else "")
        stop = cfg.patience > 0 and bad >= cfg.patience
        if ep % every == 0 or ep == epochs or ep == 1 or stop:
            say(line)
        if stop:
            say(f"early stop: no {val_name} improvement for {cfg.patience} epochs")
            break
    if best[0] is not None:
        net.load_state_dict(best[0])
        say(f"kept epoch {best[2]} ({val_name} {abs(best[1]):.4f})")
    history["val_name"] = val_name
    return history, best


def _validation_split(cfg: TrainConfig, rows: np.ndarray, groups: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Hold out cfg.val_fraction of the prompts (at least one, never all, when asked).
    Returns (training rows, validation rows, prompts, validation prompts)."""
    prompts = np.unique(groups[rows])
    n_val = int(round(cfg.val_fraction * len(prompts)))
    if cfg.val_fraction > 0 and len(prompts) >= 2:
        n_val = min(max(n_val, 1), len(prompts) - 1)
    val_prompts = rng.permutation(prompts)[:n_val] if n_val else prompts[:0]
    in_val = np.isin(groups[rows], val_prompts)
    return rows[~in_val], rows[in_val], len(prompts), n_val


def _prepare(cfg: TrainConfig, obj: Objective, features: Any, r: np.ndarray, groups: np.ndarray,
             pairs: np.ndarray | None, tr_rows: np.ndarray, va_rows: np.ndarray,
             rng: np.random.Generator, say: Callable[[str], None]
             ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, list[Batch], torch.Tensor,
                        tuple[torch.Tensor, Batch] | None]:
    """Feature statistics, the layout and the standardised training matrix, and the validation
    set as one batch. Returns (mean, std (None: not standardised), order [L], batches,
    x [L, D], (x_val, its batch) or None)."""
    # Elementwise work on the whole matrix: memory bound, so one torch thread is as fast as two
    # and far faster when other jobs share the cores (threads wait on each other per op).
    with threads.torch_threads(1):
        mean = std = None
        if cfg.standardize:
            mean, std = data.feature_stats(features, tr_rows)
        order, batches = data.layout(cfg, tr_rows, r, groups, pairs, rng, cfg.batch_size,
                                     cfg.group_size)
        if not batches:
            raise QProbeError(f"train: no training data left for {obj.name} (all pairs in "
                              "validation?)")
        if obj.check is not None:
            obj.check(batches, say)
        half = cfg.precision == "float16" and not cfg.hidden
        x = data.standardised(features, order, mean, std,
                              torch.float16 if half else torch.float32)  # [L, D]
        val = None
        if len(va_rows):
            v_order, v_batches = data.layout(cfg, va_rows, r, groups, pairs,
                                             np.random.default_rng(0), 10**12, 10**9)
            if v_batches:  # one batch; pg: a group is the whole prompt
                val = (data.standardised(features, v_order, mean, std), v_batches[0])
    return mean, std, order, batches, x, val


def train_probe(
    features: np.ndarray,
    rewards: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    pairs: np.ndarray | None = None,
    config: TrainConfig | None = None,
    *,
    feature_spec: FeatureSpec | None = None,
    prompt_ids: list[str] | np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
    data_fingerprint: str | bool = True,
    extras: tuple[str, ...] | list[str] = (),
) -> tuple[Probe, dict[str, Any]]:
    """Train a probe. Returns (probe, history).

    features: [N, D] float16/float32 (numpy or memory map); rewards: [N] float, NaN = unscored
    (needed by q/ce/pg; those rows are dropped); groups: [N] int prompt index (pg/dpo and the
    validation split; default: every row its own prompt); pairs: [P, 2] dataset rows
    (chosen, rejected) of the same prompt (bt/dpo). `data_fingerprint`: True computes the sha256
    of the training data for the probe's config, a string is stored as given, False skips it.
    `extras`: names of the log-likelihood columns that follow the features in `features`
    (see `qprobe.probe.build_inputs`).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    obj = objectives.get(cfg.objective)
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    r, groups, pairs, rows, dropped = _check_inputs(cfg, obj, features, rewards, groups, pairs,
                                                    say)
    dim = features.shape[1]
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    tr_rows, va_rows, n_prompts, n_val = _validation_split(cfg, rows, groups, rng)

    mean, std, order, batches, x, val = _prepare(cfg, obj, features, r, groups, pairs, tr_rows,
                                                 va_rows, rng, say)
    kind = _engine_kind(cfg, obj)
    probe = Probe(dim, cfg.hidden, beta=cfg.beta, objective=obj.name, feature_spec=feature_spec,
                  extras=extras,
                  mean=mean, std=std)
    net = probe.net
    if obj.start_bias is not None:  # start at the loss-optimal constant
        with torch.no_grad():
            net[-1].bias.fill_(obj.start_bias(float(np.mean(r[tr_rows]))))
    steps_per_epoch = len(batches)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    # A linear probe's fused step runs its shards on `n_threads` threads (same result for any
    # count); each torch op inside runs on one. An MLP uses torch's own threads when it is big.
    n_threads = threads.step_threads(cfg, x, native=kind == "native")
    say(f"train {obj.name}: {len(order)} rows ({len(np.unique(groups[tr_rows]))} prompts), "
        f"{len(va_rows)} validation rows, dim {dim}, {steps_per_epoch} batches/epoch, "
        f"{epochs} epochs" + (f" (raised from {cfg.epochs} by min_steps {cfg.min_steps})"
                              if epochs > cfg.epochs else "")
        + f"; {_describe(kind, cfg, obj, x, n_threads)}")
    with threads.torch_threads(threads.torch_threads_for(cfg, x)):
        engine = _engine(kind, cfg, obj, net, x, batches, n_threads)
        try:
            history, best = _epochs(cfg, obj, net, engine, steps_per_epoch, val, rng, epochs,
                                    say)
        finally:
            engine.close()
    seconds = time.perf_counter() - t0

    if data_fingerprint is True:
        data_fingerprint = fingerprint(features, None if obj.pairs else r,
                                       prompt_ids if prompt_ids is not None else groups, pairs)
    probe.info = {
        "training_data": {
            "fingerprint": data_fingerprint or None,
            "rows": int(len(rows)),
            "prompts": n_prompts,
            "pairs": None if pairs is None else int(len(pairs)),
            "dropped_unscored": dropped,
            "validation_prompts": n_val,
        },
        "train_config": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(cfg).items()},
        "metrics": {
            "epochs": int(history["epoch"][-1]),
            "steps": int(history["epoch"][-1] * steps_per_epoch),
            "final_loss": history["loss"][-1],
            "best_epoch": best[2] or None,
            (history["val_name"] or "val"): (abs(best[1]) if best[0] is not None else None),
            "seconds": round(seconds, 3),
        },
    }
    probe.eval()
    return probe, history
