"""Training a Q-probe on (features, rewards) or (features, preference pairs).

The trainer is written for CPU speed: the training rows are laid out once, standardised, as one
float16 (default) or float32 (`precision`) matrix in the order the objective needs (q/ce: shuffled
rows; pg: groups of m samples of one prompt; bt: chosen/rejected row pairs; dpo: whole prompts),
and every batch is a contiguous slice of it. A linear probe trains with a fused step that reads
each batch once, in cache-sized blocks of whole units (see "the fused linear step" below); its
epochs run in C (qprobe/linfit.c) where that can be built, else with torch operations. Each
epoch visits the batches in a new random order. Re-shuffling rows every epoch would mean
gathering the whole matrix again, which costs more than the training step itself on a CPU; the
batch composition therefore stays fixed for a run (drawn from the seed).

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
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qprobe import linfit
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.objectives import (
    bt_loss,
    ce_loss,
    dpo_loss,
    pg_loss,
    q_loss,
)
from qprobe.probe import Probe, fingerprint
from qprobe.train_config import PAIR_OBJECTIVES, TrainConfig

SMALL_PROBLEM = 1 << 23  # training matrix elements (x MLP width) below which one thread is used

__all__ = ["PAIR_OBJECTIVES", "TrainConfig", "arrays_from_rollouts", "train_probe"]

# --- batches ------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """One batch: rows [start, end) of the laid-out matrix plus the objective's index tensors."""

    start: int
    end: int
    rewards: torch.Tensor | None = None  # q/ce: [B]; pg: [G, m]
    index: torch.Tensor | None = None  # pg: [G, m] local rows (-1 pad); dpo: [P, n] others
    baseline: torch.Tensor | None = None  # pg: [G]
    chosen: torch.Tensor | None = None  # dpo: [P] local rows
    xt: torch.Tensor | None = None  # legacy float16 step: the batch's features transposed [D, B]
    rejected: torch.Tensor | None = None  # dpo: [P] local rows
    units: np.ndarray | None = None  # rows per unit that a block may not split (None: any row)
    blocks: list[_Block] | None = None  # fused linear step: cache-sized row blocks

    def unit_starts(self) -> np.ndarray:
        """[units + 1] first row of each unit, relative to `start`; the last is the row count."""
        n = self.end - self.start
        units = np.ones(n, np.int64) if self.units is None else np.asarray(self.units)
        starts = np.concatenate([[0], np.cumsum(units)])
        assert starts[-1] == n, (starts[-1], n)
        return starts

    def shard_units(self, shards: int) -> list[int]:
        """First unit of each of `shards` runs of about equal rows: shard j starts at the first
        unit boundary at or after j * rows / shards (the fused step's split, torch and C)."""
        starts = self.unit_starts()
        return [int(np.searchsorted(starts, j * starts[-1] / shards)) for j in range(shards)]


def _padded(lists: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Rows of unequal length -> int64 [len, width] padded with -1."""
    width = max((len(x) for x in lists), default=0) if width is None else width
    out = np.full((len(lists), max(width, 1)), -1, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


def _pack(sizes: list[int], batch_rows: int) -> list[tuple[int, int]]:
    """Greedy: consecutive units into batches of about batch_rows rows -> (first, last+1) units."""
    out, first, rows = [], 0, 0
    for i, s in enumerate(sizes):
        rows += s
        if rows >= batch_rows:
            out.append((first, i + 1))
            first, rows = i + 1, 0
    if first < len(sizes):
        if out and rows < batch_rows // 2:  # fold a small tail into the last batch
            out[-1] = (out[-1][0], len(sizes))
        else:
            out.append((first, len(sizes)))
    return out


def _split_by(values: np.ndarray, keys: np.ndarray) -> dict[int, np.ndarray]:
    """values [n, ...] grouped by keys [n]: {key: its values in their original order}, the keys
    in order of first appearance (as a dict filled by a loop over the values would be)."""
    srt = np.argsort(keys, kind="stable")
    uniq, first = np.unique(keys[srt], return_index=True)
    parts = np.split(values[srt], first[1:])
    return {int(uniq[i]): parts[i] for i in np.argsort(srt[first])}


def _layout(
    cfg: TrainConfig,
    rows: np.ndarray,
    rewards: np.ndarray,
    groups: np.ndarray,
    pairs: np.ndarray | None,
    rng: np.random.Generator,
    batch_rows: int,
    group_size: int,
) -> tuple[np.ndarray, list[_Batch]]:
    """Order the given rows for the objective and cut batches.

    rows: [n] dataset row indices to use; rewards, groups: [N_all]; pairs: [P, 2] dataset rows.
    Returns (order [L] dataset row per laid-out row, batches). No Python loop per sample in the
    hot path: this runs once per training run.
    """
    obj = cfg.objective
    t = torch.as_tensor
    if obj in ("q", "ce"):
        order = rows[rng.permutation(len(rows))]
        n_b = max(1, round(len(order) / batch_rows))
        bounds = np.linspace(0, len(order), n_b + 1).round().astype(int)
        return order, [
            _Batch(int(a), int(b), rewards=t(rewards[order[a:b]], dtype=torch.float32))
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    if obj == "pg":
        shuffled = rows[rng.permutation(len(rows))]
        by_prompt = _split_by(shuffled, groups[shuffled])
        if cfg.baseline == "mean":
            base_of = dict.fromkeys(by_prompt, float(np.mean(rewards[rows])))
        elif cfg.baseline == "prompt":
            base_of = {p: float(np.mean(rewards[rs])) for p, rs in by_prompt.items()}
        else:
            base_of = dict.fromkeys(by_prompt, 0.0)
        units: list[tuple[np.ndarray, float]] = []  # (rows of one group, its baseline)
        for p, rs in by_prompt.items():
            for g in np.array_split(np.asarray(rs), math.ceil(len(rs) / group_size)):
                units.append((g, base_of[p]))
        units = [units[i] for i in rng.permutation(len(units))]
        order = np.concatenate([u[0] for u in units]) if units else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum([len(u[0]) for u in units])])
        batches = []
        for a, b in _pack([len(u[0]) for u in units], batch_rows):
            s0 = int(starts[a])
            idx = _padded([np.arange(starts[i], starts[i + 1]) - s0 for i in range(a, b)])  # [G, m]
            rew = np.where(idx >= 0, rewards[order[s0 + np.maximum(idx, 0)]], 0.0)
            base = np.array([units[i][1] for i in range(a, b)])
            batches.append(_Batch(s0, int(starts[b]), rewards=t(rew, dtype=torch.float32),
                                  index=t(idx), baseline=t(base, dtype=torch.float32),
                                  units=np.diff(starts[a:b + 1])))
        return order, batches
    assert pairs is not None
    keep = np.isin(pairs[:, 0], rows) & np.isin(pairs[:, 1], rows)
    pr = pairs[keep][rng.permutation(int(keep.sum()))]  # [P, 2]
    if obj == "bt":
        order = pr.reshape(-1)  # chosen, rejected, chosen, rejected, ...
        per = max(1, batch_rows // 2)
        return order, [_Batch(2 * a, 2 * min(a + per, len(pr)),
                              units=np.full(min(a + per, len(pr)) - a, 2))
                       for a in range(0, len(pr), per)]
    # dpo: whole prompts, each followed by nothing else; pairs index into their prompt's rows
    shuffled = rows[rng.permutation(len(rows))]
    by_prompt = _split_by(shuffled, groups[shuffled])
    pairs_of = _split_by(pr, groups[pr[:, 0]])  # prompt -> [k, 2] its pairs, in pr's order
    prompts = list(pairs_of)
    prompts = [prompts[i] for i in rng.permutation(len(prompts))]
    order = np.concatenate([by_prompt[p] for p in prompts]) if prompts else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum([len(by_prompt[p]) for p in prompts])])
    batches = []
    for a, b in _pack([len(by_prompt[p]) for p in prompts], batch_rows):
        s0 = int(starts[a])
        ch, rj, others = [], [], []
        for i in range(a, b):
            mine = by_prompt[prompts[i]]  # [n] dataset rows in layout order
            pp = pairs_of[prompts[i]]  # [k, 2] dataset rows
            by_row = np.argsort(mine)
            c, r = (by_row[np.searchsorted(mine[by_row], pp[:, j])] for j in (0, 1))  # [k] each
            rest = np.ones((len(pp), len(mine)), dtype=bool)  # [k, n]: the pair's other samples
            rest[np.arange(len(pp)), c] = rest[np.arange(len(pp)), r] = False
            at = int(starts[i]) - s0  # the prompt's first row in the batch
            ch.append(c + at)
            rj.append(r + at)
            others.append(np.nonzero(rest)[1].reshape(len(pp), len(mine) - 2) + at)
        index = np.full((sum(map(len, ch)), max(1, max(o.shape[1] for o in others))), -1)
        at = 0
        for o in others:  # [k, n - 2] each, padded with -1 to the widest
            index[at:at + len(o), :o.shape[1]] = o
            at += len(o)
        batches.append(_Batch(s0, int(starts[b]), chosen=t(np.concatenate(ch)),
                              rejected=t(np.concatenate(rj)), index=t(index),
                              units=np.diff(starts[a:b + 1])))
    return order, batches


def _gather(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """scores [B] indexed by index [...] with -1 meaning 'absent' -> [...] with -inf there."""
    ext = torch.cat([scores, scores.new_full((1,), -math.inf)])  # [B + 1]; -1 picks the -inf
    return ext[index]


def _batch_loss(cfg: TrainConfig, scores: torch.Tensor, b: _Batch) -> torch.Tensor:
    """Loss of one batch given its scores [B] (rows in layout order)."""
    obj = cfg.objective
    if obj == "q":
        return q_loss(scores, b.rewards)
    if obj == "ce":
        return ce_loss(scores, b.rewards)
    if obj == "pg":
        return pg_loss(_gather(scores, b.index), b.rewards, cfg.beta, b.baseline)
    if obj == "bt":
        s = scores.view(-1, 2)  # [P, 2]: chosen, rejected
        return bt_loss(s[:, 0], s[:, 1])
    return dpo_loss(scores[b.chosen], scores[b.rejected], _gather(scores, b.index), cfg.beta)


def _standardised(features: np.ndarray, order: np.ndarray, mean: np.ndarray | None,
                  std: np.ndarray | None, dtype: torch.dtype = torch.float32, chunk: int = 256
                  ) -> torch.Tensor:
    """features[order] as one tensor [L, D] of `dtype`, standardised in float32, built in
    cache-sized chunks."""
    out = torch.empty((len(order), features.shape[1]), dtype=dtype)  # [L, D]
    lib = _native_setup(features)
    if lib is not None:  # one pass in C
        dim = features.shape[1]
        mean = np.zeros(dim, np.float32) if mean is None else mean
        inv = np.ones(dim, np.float32) if std is None else (1.0 / std).astype(np.float32)
        if not lib.standardise(features, order, mean, inv, out, _setup_threads()):
            raise QProbeError("train: features contain NaN or inf")
        return out
    buf = torch.empty((chunk, features.shape[1]), dtype=torch.float32)
    mu = None if mean is None else torch.from_numpy(mean)
    inv_sd = None if std is None else torch.from_numpy(1.0 / std)
    for i in range(0, len(order), chunk):
        part = buf[: len(order[i:i + chunk])]
        part.copy_(torch.from_numpy(np.ascontiguousarray(features[order[i:i + chunk]])))
        if not math.isfinite(float(part.sum())):  # one cheap pass; any NaN/inf poisons it
            raise QProbeError("train: features contain NaN or inf")
        if mu is not None:
            part.sub_(mu).mul_(inv_sd)
        out[i:i + len(part)] = part
    return out


def _native_step() -> linfit.Library | None:
    """linfit.c for a linear probe's steps, unless switched off here or unavailable."""
    return linfit.library() if NATIVE and not LEGACY_STEP else None


def _native_setup(features: np.ndarray) -> linfit.Library | None:
    """linfit.c for the setup passes, if it can be built and read `features` directly."""
    return linfit.library() if NATIVE and linfit.readable(features) else None


def _cores() -> int:
    """CPU cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _setup_threads() -> int:
    """Threads for the setup passes: they are bound by memory traffic, which two cores
    stream faster than one."""
    return min(2, _cores())


def _feature_stats(features: np.ndarray, rows: np.ndarray, chunk: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the given rows -> float32 [D] x2.

    Cache-sized float32 chunks, float64 totals. The first chunk's mean is subtracted before
    squaring so that var = E[(x-k)^2] - E[x-k]^2 does not cancel when |mean| >> std."""
    rows = np.sort(rows)
    shift = torch.from_numpy(features[rows[:chunk]].astype(np.float32).mean(0))  # [D]
    lib = _native_setup(features)
    if lib is not None:  # one pass in C
        s1, s2 = lib.column_sums(features, rows, shift.numpy(), _setup_threads())
        s, s2 = torch.from_numpy(s1), torch.from_numpy(s2)
    else:
        buf = torch.empty((chunk, features.shape[1]), dtype=torch.float32)  # [chunk, D]
        s = torch.zeros(features.shape[1], dtype=torch.float64)
        s2 = torch.zeros(features.shape[1], dtype=torch.float64)
        for i in range(0, len(rows), chunk):
            part = buf[: len(rows[i:i + chunk])]
            part.copy_(torch.from_numpy(np.ascontiguousarray(features[rows[i:i + chunk]])))
            part.sub_(shift)
            s += part.sum(0)
            s2 += part.mul_(part).sum(0)
    mean = s / len(rows)
    std = (s2 / len(rows) - mean * mean).clamp_min_(0.0).sqrt_().numpy()
    mean = (mean + shift).numpy()
    std = np.where(std > 1e-6 * max(1.0, float(np.abs(mean).max(initial=0.0))), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# --- validation -----------------------------------------------------------------------------
@torch.no_grad()
def _val_metric(cfg: TrainConfig, net: torch.nn.Module, x: torch.Tensor, b: _Batch
                ) -> tuple[str, float, bool]:
    """(name, value, higher_is_better) of the validation set laid out as one batch."""
    scores = net(x[b.start:b.end]).squeeze(-1)  # [B]
    if cfg.objective == "pg":  # expected reward of softmax(Q/beta) over ALL samples of a prompt
        sel = -pg_loss(_gather(scores, b.index), b.rewards, cfg.beta)
        return "val_sel_reward", float(sel), True
    if cfg.objective == "bt":  # share of pairs ranked right
        s = scores.view(-1, 2)
        return "val_pair_acc", float((s[:, 0] > s[:, 1]).float().mean()), True
    if cfg.objective == "dpo":
        return "val_pair_acc", float((scores[b.chosen] > scores[b.rejected]).float().mean()), True
    return "val_loss", float(_batch_loss(cfg, scores, b)), False


@contextlib.contextmanager
def _threads(n: int):
    """Run with n torch threads. Small problems train faster on one: per-op thread
    synchronisation costs more than the arithmetic, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _step_threads(cfg: TrainConfig, x: torch.Tensor) -> int:
    """Threads for the linear step: cfg.threads, or (0: auto) one per shard when a batch holds
    enough features to be worth sharing and the process may use that many cores: at least
    NATIVE_PARALLEL_BYTES in linfit.c, PARALLEL_BATCH_BYTES in the torch step. Smaller batches
    were as fast or faster on one thread (bench/train_speed.py, 2 cores): the hand-over between
    threads (and in torch the GIL held by small operations) cost what they gain."""
    if cfg.hidden:
        return 1
    if cfg.threads:
        return min(cfg.threads, SHARDS)
    cores = _cores()
    native = _native_step() is not None
    batch_bytes = min(cfg.batch_size, len(x)) * x.shape[1] * x.element_size()
    enough = NATIVE_PARALLEL_BYTES if native else PARALLEL_BATCH_BYTES
    return SHARDS if batch_bytes >= enough and cores >= SHARDS else 1


# --- the trainer --------------------------------------------------------------------------------
def _linear_step(cfg: TrainConfig, layer: torch.nn.Linear, xb: torch.Tensor, b: _Batch
                 ) -> torch.Tensor:
    """The previous linear step (LEGACY_STEP; bench/train_speed.py compares against it): loss and
    gradients of a linear probe with two matrix-vector products.

    Autograd only runs on the score vector; the gradient of the weights is X^T dL/ds. Same maths
    as `loss.backward()`, but reads the batch twice instead of going through a general matmul
    (a [B, D] x [D, 1] GEMM is several times slower than a GEMV on CPU).
    float16 (`precision`): xb is half precision and b.xt its transposed copy; the products run
    as half-precision GEMVs with float32 accumulation, on vectors scaled to their max so that
    small weights and gradients do not underflow.
    """
    w, bias = layer.weight, layer.bias  # [1, D], [1]
    half = xb.dtype == torch.float16
    with torch.no_grad():
        if half:
            ws = w.abs().max().clamp_min(1e-30)
            scores = F.linear(xb, (w / ws).half()).squeeze(-1).float() * ws + bias  # [B]
        else:
            scores = torch.mv(xb, w[0]) + bias  # [B]
    scores.requires_grad_(True)
    loss = _batch_loss(cfg, scores, b)
    (ds,) = torch.autograd.grad(loss, scores)  # [B]
    if half:
        gs = ds.abs().max().clamp_min(1e-30)
        w.grad = F.linear((ds / gs).half()[None], b.xt).float() * gs  # [1, D]
    else:
        w.grad = torch.mv(xb.t(), ds).unsqueeze(0)  # [1, D]
    bias.grad = ds.sum().reshape(1)
    return loss


# --- the fused linear step ----------------------------------------------------------------------
# A linear probe's per-row gradient dL/ds_i depends only on the scores of the row's own unit
# (q/ce: the row, pg: its group, bt: its pair, dpo: its prompt), and the layout keeps units
# contiguous. So a batch is processed in cache-sized blocks of whole units: s = X_blk w, then
# dL/ds of the block's units (closed form below, checked against objectives.py's autograd), then
# grad += X_blk^T dL/ds while X_blk is still in cache: one pass over the batch in memory per step
# instead of two. Half-precision features are upcast block by block into a float32 buffer, so all
# arithmetic is float32 whatever the storage.
BLOCK_BYTES = 6 << 20  # torch step: float32 bytes of one block, 384 rows at 4096 dims (tuned)
NATIVE_BLOCK_BYTES = 256 << 10  # linfit.c: feature bytes of one block (64 kB-1 MB ran alike)
SHARDS = 2  # runs of whole units per batch, one per core on a 2-core machine (see _FusedLinear)
PARALLEL_BATCH_BYTES = 4 << 20  # auto threads, torch step: batches this big run shards at once
NATIVE_PARALLEL_BYTES = 1 << 20  # the same for linfit.c (1000 rows of 896 dims in float16: yes)
NATIVE = True  # False: linear probes train with the torch step even where linfit.c can be built
LEGACY_STEP = False  # True: the previous two-pass step (kept for bench/train_speed.py's ratios)


@dataclass
class _Block:
    """Rows [start, end) of a batch and the index tensors of its units, all batch-relative;
    `pad` (the slot after the widest batch) holds score -inf and absorbs padding gradients."""

    start: int
    end: int
    rewards: torch.Tensor | None = None  # q/ce: [n]; pg: [G, m] (padding 0)
    index: torch.Tensor | None = None  # pg: [G*m] rows of the groups; dpo: [P*k] others
    pos: torch.Tensor | None = None  # pg: [n] position of each row in the flat [G*m] matrix
    width: int = 0  # pg: m; dpo: k (others per pair)
    pair: torch.Tensor | None = None  # dpo: [P*2] chosen, rejected, chosen, ...
    targets: torch.Tensor | None = None  # dpo: [P*2 + P*k] pair, then index


def _make_blocks(cfg: TrainConfig, b: _Batch, rows: int, pad: int, shards: int = 1
                 ) -> list[list[_Block]]:
    """Cut a batch into `shards` runs of about equal rows, each into blocks of at most `rows`
    rows (or one unit); no block splits a unit. Returns the blocks of each shard."""
    starts = b.unit_starts()  # [units + 1]
    n_units = len(starts) - 1
    shard_starts = b.shard_units(shards)
    unit_cuts = [0]  # first unit of each block; a block also ends where a shard starts
    for i in range(1, n_units):
        if i in shard_starts or starts[i + 1] - starts[unit_cuts[-1]] > rows:
            unit_cuts.append(i)
    unit_cuts.append(n_units)
    bounds = [int(starts[u]) for u in unit_cuts]  # block j: rows [bounds[j], bounds[j + 1])
    shard_of = [bisect.bisect_right(shard_starts, u) - 1 for u in unit_cuts[:-1]]
    out = []
    pair_at = 0
    for j in range(len(bounds) - 1):
        s, e = bounds[j], bounds[j + 1]
        blk = _Block(s, e)
        if cfg.objective in ("q", "ce"):
            blk.rewards = b.rewards[s:e]
        elif cfg.objective == "pg":
            g0, g1 = unit_cuts[j], unit_cuts[j + 1]
            idx = b.index[g0:g1]  # [G, m]
            blk.index = torch.where(idx >= 0, idx, pad).reshape(-1)
            blk.width = idx.shape[1]
            blk.pos = torch.nonzero(blk.index != pad).squeeze(1)  # [n] rows in order
            assert torch.equal(blk.index[blk.pos], torch.arange(s, e))
            blk.rewards = b.rewards[g0:g1]
        elif cfg.objective == "dpo":
            pair_end = pair_at
            while pair_end < len(b.chosen) and int(b.chosen[pair_end]) < e:
                pair_end += 1
            ch, rj = b.chosen[pair_at:pair_end], b.rejected[pair_at:pair_end]  # [P]
            oth = b.index[pair_at:pair_end]  # [P, k]
            assert bool(((ch >= s) & (rj >= s) & (rj < e)).all())
            assert bool(((oth < 0) | ((oth >= s) & (oth < e))).all())
            blk.pair = torch.stack([ch, rj], 1).reshape(-1)
            blk.index = torch.where(oth >= 0, oth, pad).reshape(-1)
            blk.targets = torch.cat([blk.pair, blk.index])
            blk.width = oth.shape[1]
            pair_at = pair_end
        out.append(blk)
    per_shard: list[list[_Block]] = [[] for _ in range(shards)]
    for blk, j in zip(out, shard_of):
        per_shard[j].append(blk)
    return per_shard


def _batch_scale(cfg: TrainConfig, b: _Batch) -> float:
    """1 / the count the batch loss is a mean over (rows, groups or pairs)."""
    if cfg.objective in ("q", "ce"):
        return 1.0 / (b.end - b.start)
    if cfg.objective == "pg":
        return 1.0 / b.index.shape[0]
    if cfg.objective == "bt":
        return 2.0 / (b.end - b.start)
    return 1.0 / len(b.chosen)


def _block_grad(cfg: TrainConfig, s_all: torch.Tensor, blk: _Block, scale: float,
                g_all: torch.Tensor) -> torch.Tensor:
    """g_all[block rows] <- dL/ds of the batch loss, from the scores s_all [B + pad] (only the
    block's rows are read: its units are complete). Returns the block's share of the loss
    divided by `scale` (pg: without the baseline term).

    Closed forms of the gradients of objectives.py's losses (u = s / beta):
    q: 2 (s - r) / B.  ce: (sigmoid(s) - r) / B.  bt: -/+ sigmoid(-(s_w - s_l)) / P.
    pg: -(p_i / beta) (r_i - sum_j p_j r_j) / G with p = softmax(u) over the group.
    dpo: with c = logsumexp(u_others), m = log sigmoid(u_w - c) - log sigmoid(u_l - c) and
    dL/dm = -beta sigmoid(-beta m) / P: dm/du_w = sigmoid(c - u_w), dm/du_l = -sigmoid(c - u_l),
    dm/du_j = (sigmoid(c - u_l) - sigmoid(c - u_w)) softmax(u_others)_j for every other j.
    """
    obj = cfg.objective
    s, g = s_all[blk.start:blk.end], g_all[blk.start:blk.end]  # [n]
    if obj == "q":
        torch.sub(s, blk.rewards, out=g)
        loss = g.dot(g)  # sum (s - r)^2
        g.mul_(2.0 * scale)
    elif obj == "ce":
        loss = F.binary_cross_entropy_with_logits(s, blk.rewards, reduction="sum")
        torch.sigmoid(s, out=g).sub_(blk.rewards).mul_(scale)
    elif obj == "bt":
        d = s[1::2] - s[0::2]  # [P] s_l - s_w
        loss = F.softplus(d).sum()  # -log sigmoid(s_w - s_l)
        q = d.sigmoid_().mul_(scale)
        torch.neg(q, out=g[0::2])
        g[1::2] = q
    elif obj == "pg":
        p = torch.index_select(s_all, 0, blk.index).div_(cfg.beta).view(-1, blk.width)  # [G, m]
        p = torch.softmax(p, dim=-1)  # padding gets 0
        pr = p * blk.rewards  # [G, m] p_i r_i
        ev = pr.sum(-1, keepdim=True)  # [G, 1] sum_i p_i r_i
        loss = -ev.sum()
        d = pr.sub_(p.mul_(ev))  # p_i (r_i - sum_j p_j r_j)
        torch.index_select(d.view(-1), 0, blk.pos, out=g).mul_(-scale / cfg.beta)
    else:
        beta = cfg.beta
        e = torch.index_select(s_all, 0, blk.index).div_(beta).view(-1, blk.width)  # [P, k]
        top = e.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # [P, 1]
        e.sub_(top).exp_()  # exp(u_j - top): the top one is 1, padding 0
        tot = e.sum(-1, keepdim=True)  # [P, 1]: >= 1 where the pair has another sample, else 0
        has = (tot > 0)[:, 0]  # [P]
        c = torch.where(tot > 0, tot.log().add_(top), 0.0)  # [P, 1] logsumexp(u_others)
        z = torch.index_select(s_all, 0, blk.pair).div_(beta).view(-1, 2).sub_(c)  # [P, 2] u - c
        ls = F.logsigmoid(z)  # [P, 2]
        m = (ls[:, 0] - ls[:, 1]).mul_(has)  # [P] margin (0: no other sample)
        loss = F.softplus(m.mul_(-beta)).sum()  # -log sigmoid(beta m)
        dm = m.sigmoid_().mul_(has).mul_(-scale)  # [P] dL/dm / beta  (du = ds / beta)
        a = z.neg_().sigmoid_()  # [P, 2] sigmoid(c - u_w), sigmoid(c - u_l)
        e.mul_((a[:, 1] - a[:, 0]).mul_(dm)[:, None].div_(tot.clamp_min_(1.0)))  # others
        a.mul_(dm[:, None])
        a[:, 1].neg_()  # chosen: dm sigmoid(c - u_w); rejected: -dm sigmoid(c - u_l)
        g.zero_()
        g_all.index_add_(0, blk.targets, torch.cat([a.view(-1), e.view(-1)]))
    return loss


class _Shard:
    """One thread's share of the fused step: its own buffers (its blocks are in _Batch.blocks)."""

    def __init__(self, most: int, dim: int, pad: int, dtype: torch.dtype, upcast: bool):
        # [R, D] float32 copy of a half-precision block
        self.buf = torch.empty((most, dim), dtype=dtype) if upcast else None
        self.s = torch.full((pad + 1,), -math.inf, dtype=dtype)  # [B + 1] scores; [pad] = -inf
        self.g = torch.zeros(pad + 1, dtype=dtype)  # [B + 1] dL/ds; [pad] collects padding
        self.gw = torch.zeros(dim, dtype=dtype)  # [D] this shard's weight gradient


class _FusedLinear:
    """Blocks and preallocated buffers of the fused step for one training run.

    Every batch is cut into SHARDS runs of whole units of about equal size. Each shard's weight
    gradient, loss and bias gradient are computed on their own and then summed in shard order,
    so the result does not depend on how many threads run the shards: with `threads` = 2 they run
    at the same time (the step is bound by memory bandwidth, and two cores stream more than
    one); with 1 they run one after the other, bit for bit the same.

    float16 features are upcast block by block into a float32 buffer (blocks of up to BLOCK_BYTES
    of float32). This is the reference and the fallback of linfit.c, which runs the same step
    without Python between steps wherever it can be built."""

    def __init__(self, cfg: TrainConfig, dim: int, batches: list[_Batch],
                 block_rows: int | None = None, dtype: torch.dtype = torch.float32,
                 threads: int = 1, half: bool = False):
        self.cfg = cfg
        if block_rows is None:
            block_rows = BLOCK_BYTES // (4 * dim)
        rows = max(8, block_rows)
        pad = max(b.end - b.start for b in batches)
        for b in batches:
            b.blocks = _make_blocks(cfg, b, rows, pad, SHARDS)
        most = max((blk.end - blk.start for b in batches for sh in b.blocks for blk in sh),
                   default=1)
        self.shards = [_Shard(most, dim, pad, dtype, half) for _ in range(SHARDS)]
        self.pool = None
        if threads > 1:  # the other shards run on worker threads (torch ops and ctypes calls
            # release the GIL); each op inside runs on its caller's thread only
            self.pool = ThreadPoolExecutor(SHARDS - 1, initializer=torch.set_num_threads,
                                           initargs=(1,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _run(self, j: int, x: torch.Tensor, b: _Batch, w: torch.Tensor, bias: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shard j of batch b: its weight gradient into shards[j].gw; returns (loss / scale,
        the sum of its dL/ds (the bias gradient; q/ce only))."""
        sh = self.shards[j]
        sh.gw.zero_()
        losses = []
        for blk in b.blocks[j]:
            xb = x[b.start + blk.start:b.start + blk.end]  # [R, D]
            s, g = sh.s[blk.start:blk.end], sh.g[blk.start:blk.end]  # [R]
            if sh.buf is not None:
                xb = sh.buf[: len(xb)].copy_(xb)
            torch.addmv(bias, xb, w, out=s)
            losses.append(_block_grad(self.cfg, sh.s, blk, scale, sh.g))
            torch.addmv(sh.gw, xb.t(), g, out=sh.gw)
        if not losses:
            return torch.zeros((), dtype=sh.s.dtype), None
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        gsum = None
        if self.cfg.objective in ("q", "ce"):
            first, last = b.blocks[j][0].start, b.blocks[j][-1].end
            gsum = sh.g[first:last].sum()
        return total, gsum

    def step(self, layer: torch.nn.Linear, x: torch.Tensor, b: _Batch) -> torch.Tensor:
        """Set layer's .grad for batch b (rows of x) in one pass; returns the batch loss."""
        w, bias = layer.weight.detach()[0], layer.bias.detach()  # [D], [1]
        scale = _batch_scale(self.cfg, b)
        if self.pool is None:
            parts = [self._run(j, x, b, w, bias, scale) for j in range(SHARDS)]
        else:
            futures = [self.pool.submit(self._run, j, x, b, w, bias, scale)
                       for j in range(1, SHARDS)]
            parts = [self._run(0, x, b, w, bias, scale)] + [f.result() for f in futures]
        gw = self.shards[0].gw.clone()
        total = parts[0][0]
        for sh, p in zip(self.shards[1:], parts[1:]):  # in shard order, whatever ran where
            gw += sh.gw
            total = total + p[0]
        layer.weight.grad = gw.unsqueeze(0)
        # pg/bt/dpo only compare scores of one prompt: their bias gradient is exactly 0 (a sum of
        # rounding errors here, which Adam would turn into lr-sized steps)
        if self.cfg.objective in ("q", "ce"):
            gsums = [p[1] for p in parts if p[1] is not None]
            gsum = gsums[0]
            for more in gsums[1:]:
                gsum = gsum + more
            layer.bias.grad = gsum.reshape(1)
        else:
            layer.bias.grad = torch.zeros_like(bias)
        if self.cfg.objective == "pg" and b.baseline is not None:
            total = total + b.baseline.sum()  # -sum_i p_i (r_i - b) = -sum_i p_i r_i + b per group
        return total * scale


class _Adam:
    """Adam (or AdamW: decoupled weight decay) as torch.optim.Adam(W) computes it, in six in-place
    ops per tensor. For a linear probe torch's optimizer costs ~190 us of Python per step on this
    2-core machine, as much as the arithmetic of a whole 896-dim step."""

    def __init__(self, params: Any, lr: float, weight_decay: float, decoupled: bool,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd, self.decoupled, self.betas, self.eps = lr, weight_decay, decoupled, \
            betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]  # first moments
        self.v = [torch.zeros_like(p) for p in self.params]  # second moments
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        step = self.lr / (1 - b1 ** self.t)
        root_bc2 = math.sqrt(1 - b2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if self.wd and self.decoupled:
                p.mul_(1 - self.lr * self.wd)
            elif self.wd:
                g = g.add(p, alpha=self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(root_bc2).add_(self.eps), value=-step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _fit(cfg: TrainConfig, net: torch.nn.Module, x: torch.Tensor, batches: list[_Batch],
         val: tuple[torch.Tensor, _Batch] | None, rng: np.random.Generator, epochs: int,
         say: Callable[[str], None], threads: int = 1
         ) -> tuple[dict[str, Any], tuple[Any, float, int]]:
    """The optimisation loop: epochs of shuffled batches, validation, early stopping.

    A linear probe takes its steps in linfit.c where that can be built (a whole epoch per call),
    else with the fused torch step and `_Adam`; an MLP with autograd and torch's Adam."""
    linear = len(net) == 1
    lib = _native_step() if linear else None
    if lib is not None:
        block = max(8, NATIVE_BLOCK_BYTES // (x.shape[1] * x.element_size()))
        native = linfit.LinearFit(lib, cfg, x, batches, net[0], SHARDS, threads, block)
        return _epochs(cfg, net, lambda order: float(native.steps(order).sum()), len(batches),
                       val, rng, epochs, say)
    if linear and not LEGACY_STEP:
        adam = _Adam(net.parameters(), cfg.lr, cfg.weight_decay, cfg.optimizer == "adamw")
        fused = _FusedLinear(cfg, x.shape[1], batches, threads=threads,
                             half=x.dtype == torch.float16)

        def run(order: np.ndarray) -> float:
            total = torch.zeros(())
            for i in order:
                total += fused.step(net[0], x, batches[i]).detach()
                adam.step()
            return float(total)

        try:
            return _epochs(cfg, net, run, len(batches), val, rng, epochs, say)
        finally:
            fused.close()
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel per step instead of a dozen small ops (the probe has few parameters)
    opt = opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    def run_autograd(order: np.ndarray) -> float:
        total = torch.zeros(())
        for i in order:
            b = batches[i]
            xb = x[b.start:b.end]  # [B, D], a view: no copy
            if linear:  # LEGACY_STEP
                loss = _linear_step(cfg, net[0], xb, b)
            else:
                loss = _batch_loss(cfg, net(xb).squeeze(-1), b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            total += loss.detach()
        return float(total)

    return _epochs(cfg, net, run_autograd, len(batches), val, rng, epochs, say)


def _epochs(cfg: TrainConfig, net: torch.nn.Module, run: Callable[[np.ndarray], float],
            steps_per_epoch: int, val: tuple[torch.Tensor, _Batch] | None,
            rng: np.random.Generator, epochs: int, say: Callable[[str], None]
            ) -> tuple[dict[str, Any], tuple[Any, float, int]]:
    """Epochs of `run(batch order) -> summed loss`, with validation and early stopping."""
    history: dict[str, Any] = {"epoch": [], "loss": [], "val": [], "val_name": ""}
    best = (None, -math.inf, 0)  # (state, value with 'higher is better' sign, epoch)
    bad = 0
    every = max(1, epochs // 10)
    val_name = ""
    for ep in range(1, epochs + 1):
        ep_loss = run(rng.permutation(steps_per_epoch)) / steps_per_epoch
        if not math.isfinite(ep_loss):
            raise QProbeError(f"train: loss became {ep_loss} at epoch {ep}; lower --lr")
        history["epoch"].append(ep)
        history["loss"].append(ep_loss)
        line = f"epoch {ep}/{epochs} loss {ep_loss:.4f}"
        if val is not None:
            val_name, v, higher = _val_metric(cfg, net, *val)
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
) -> tuple[Probe, dict[str, Any]]:
    """Train a probe. Returns (probe, history).

    features: [N, D] float16/float32 (numpy or memory map); rewards: [N] float, NaN = unscored
    (needed by q/ce/pg; those rows are dropped); groups: [N] int prompt index (pg/dpo and the
    validation split; default: every row its own prompt); pairs: [P, 2] dataset rows
    (chosen, rejected) of the same prompt (bt/dpo). `data_fingerprint`: True computes the sha256
    of the training data for the probe's config, a string is stored as given, False skips it.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    x_all = features
    if getattr(x_all, "ndim", 0) != 2 or len(x_all) == 0:
        raise QProbeError(f"train: features must be a non-empty [N, D] array, got "
                          f"{getattr(x_all, 'shape', None)}")
    n, dim = x_all.shape
    if groups is None:
        groups = np.arange(n)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,):
        raise QProbeError(f"train: groups must have shape [{n}], got {groups.shape}")
    obj = cfg.objective
    r = np.full(n, np.nan, np.float32) if rewards is None else np.asarray(rewards, np.float32)
    if r.shape != (n,):
        raise QProbeError(f"train: rewards must have shape [{n}], got {r.shape}")
    dropped = 0
    if obj in PAIR_OBJECTIVES:
        if pairs is None or len(pairs) == 0:
            raise QProbeError(f"train: objective {obj} needs preference pairs (pairs.parquet)")
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
            raise QProbeError(f"train: no rows with a reward; {obj} needs rewards")
        if obj == "ce" and ((r[usable] < 0) | (r[usable] > 1)).any():
            raise QProbeError("train: ce needs rewards in [0, 1]; use --objective q or pg")
    rows = np.flatnonzero(usable)

    # validation split by prompt
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    prompts = np.unique(groups[rows])
    n_val = int(round(cfg.val_fraction * len(prompts)))
    if cfg.val_fraction > 0 and len(prompts) >= 2:
        n_val = min(max(n_val, 1), len(prompts) - 1)
    val_prompts = rng.permutation(prompts)[:n_val] if n_val else prompts[:0]
    in_val = np.isin(groups[rows], val_prompts)
    tr_rows, va_rows = rows[~in_val], rows[in_val]

    # Setup is elementwise work on the whole matrix: memory bound, so one thread is as fast as
    # two and far faster when other jobs share the cores (threads wait on each other per op).
    with contextlib.nullcontext() if LEGACY_STEP else _threads(1):
        mean = std = None
        if cfg.standardize:
            mean, std = _feature_stats(x_all, tr_rows)
        order, batches = _layout(cfg, tr_rows, r, groups, pairs, rng, cfg.batch_size, cfg.group_size)
        if not batches:
            raise QProbeError(f"train: no training data left for {obj} (all pairs in validation?)")
        if obj == "pg" and not any(b.index.shape[1] > 1 and (b.index[:, 1] >= 0).any()
                                   for b in batches):
            raise QProbeError("train: pg needs at least 2 samples of a prompt (one group)")
        if obj == "dpo":
            lonely = sum(int((~torch.isfinite(_gather(torch.zeros(b.end - b.start), b.index))
                              ).all(-1).sum()) for b in batches)
            total = sum(len(b.chosen) for b in batches)
            if lonely == total:
                raise QProbeError("train: dpo needs samples of a prompt besides the pair (finite-k "
                                  "policy); with pairs only, use --objective bt")
            if lonely:
                say(f"warning: dpo: {lonely} of {total} pairs have no other sample of their prompt "
                    "and carry no signal")
        half = cfg.precision == "float16" and not cfg.hidden
        x = _standardised(x_all, order, mean, std, torch.float16 if half else torch.float32)  # [L, D]
        if half and LEGACY_STEP:
            for b in batches:
                b.xt = x[b.start:b.end].t().contiguous()  # [D, B]
        val = None
        if len(va_rows):
            v_order, v_batches = _layout(cfg, va_rows, r, groups, pairs, np.random.default_rng(0),
                                         10**12, 10**9)  # one batch; pg: a group is the whole prompt
            if v_batches:
                val = (_standardised(x_all, v_order, mean, std), v_batches[0])

    probe = Probe(dim, cfg.hidden, beta=cfg.beta, objective=obj, feature_spec=feature_spec,
                  mean=mean, std=std)
    net = probe.net
    out_layer = net[-1]
    with torch.no_grad():  # q/ce: start at the loss-optimal constant
        mr = float(np.mean(r[tr_rows])) if obj in ("q", "ce") else 0.0
        if obj == "q":
            out_layer.bias.fill_(mr)
        elif obj == "ce":
            out_layer.bias.fill_(math.log(min(max(mr, 1e-3), 1 - 1e-3) /
                                          (1 - min(max(mr, 1e-3), 1 - 1e-3))))
    steps_per_epoch = len(batches)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    # A linear probe's fused step runs its shards on `threads` threads (same result for any
    # count); each torch op inside runs on one. An MLP uses torch's own threads when it is big.
    threads = _step_threads(cfg, x)
    rows_of = str(x.dtype).removeprefix("torch.")
    if cfg.hidden:
        engine = "MLP, autograd"
    elif _native_step() is not None:
        engine = f"{rows_of} rows, C step on {threads} thread(s)"
    else:
        engine = (f"{rows_of} rows, torch step on {threads} thread(s) (C step: "
                  f"{linfit.why_not or 'off'})")
    say(f"train {obj}: {len(order)} rows ({len(np.unique(groups[tr_rows]))} prompts), "
        f"{len(va_rows)} validation rows, dim {dim}, {steps_per_epoch} batches/epoch, "
        f"{epochs} epochs" + (f" (raised from {cfg.epochs} by min_steps {cfg.min_steps})"
                              if epochs > cfg.epochs else "") + f"; {engine}")
    small = not cfg.hidden or x.numel() * sum(cfg.hidden) < SMALL_PROBLEM
    with _threads(1 if small else torch.get_num_threads()):
        history, best = _fit(cfg, net, x, batches, val, rng, epochs, say, threads)
    seconds = time.perf_counter() - t0

    if data_fingerprint is True:
        data_fingerprint = fingerprint(x_all, r if obj not in PAIR_OBJECTIVES else None,
                                       prompt_ids if prompt_ids is not None else groups, pairs)
    probe.info = {
        "training_data": {
            "fingerprint": data_fingerprint or None,
            "rows": int(len(rows)),
            "prompts": int(len(prompts)),
            "pairs": None if pairs is None else int(len(pairs)),
            "dropped_unscored": dropped,
            "validation_prompts": int(n_val),
        },
        "train_config": _jsonable(asdict(cfg)),
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


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --- from a rollouts folder -------------------------------------------------------------------
def arrays_from_rollouts(r: Any, objective: str) -> dict[str, Any]:
    """Features, rewards, groups, pairs and prompt ids of a `qprobe.rollouts.Rollouts`."""
    where = str(getattr(r, "path", getattr(r, "dir", "rollouts")))
    if r.feature_spec is None:
        raise QProbeError(f"{where}: rollouts carry no features (no feature_spec in meta.json); "
                          "collect with features or embed them first")
    features = r.features  # [N, D]
    group, _ = r.groups()
    pids = r.prompt_ids
    out: dict[str, Any] = {"features": features, "rewards": r.rewards, "groups": group,
                           "prompt_ids": pids, "pairs": None, "feature_spec": r.feature_spec}
    if objective in PAIR_OBJECTIVES:
        table = r.pairs
        if table is None or table.num_rows == 0:
            raise QProbeError(f"{where}: objective {objective} needs pairs.parquet "
                              "(preference pairs)")
        missing = {"prompt_id", "chosen", "rejected"} - set(table.column_names)
        if missing:
            raise QProbeError(f"{where}/pairs.parquet: missing column(s) {sorted(missing)}")
        row_of = {(p, int(s)): i for i, (p, s) in enumerate(zip(pids.tolist(),
                                                                r.sample_idx.tolist()))}
        pairs = []
        for p, c, j in zip(table.column("prompt_id").to_pylist(),
                           table.column("chosen").to_pylist(),
                           table.column("rejected").to_pylist()):
            try:
                pairs.append((row_of[(str(p), int(c))], row_of[(str(p), int(j))]))
            except (KeyError, TypeError, ValueError):
                raise QProbeError(f"{where}/pairs.parquet: pair ({p!r}, {c!r}, {j!r}) refers to "
                                  "a sample that is not in the rollouts") from None
        out["pairs"] = np.asarray(pairs, dtype=np.int64)
    return out


def config_fields() -> list[Any]:
    """The TrainConfig dataclass fields (for generic CLI / YAML mapping)."""
    return list(fields(TrainConfig))
