"""The training data: batches laid out as an objective needs them, feature statistics, the
standardised training matrix, and the arrays of a rollouts folder.

A layout orders the training rows once per run so that every batch is a contiguous slice of one
matrix and every unit an objective compares inside (q/ce: a row, pg: a group of one prompt's
samples, bt: a chosen/rejected pair, dpo: a whole prompt) is a contiguous run of rows. Each
objective names its layout in the registry (`qprobe.train.objectives`); the engines read the
batches, never the objective's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qprobe.errors import QProbeError
from qprobe.train import objectives, threads
from qprobe.train.config import TrainConfig
from qprobe.train.engines import native

__all__ = ["LAYOUTS", "Batch", "arrays_from_rollouts", "feature_stats", "layout", "standardised"]


@dataclass
class Batch:
    """One batch: rows [start, end) of the laid-out matrix plus the layout's index tensors."""

    start: int
    end: int
    terms: int  # how many terms the batch loss is a mean of (rows, groups or pairs)
    rewards: torch.Tensor | None = None  # rows: [B]; groups: [G, m]
    index: torch.Tensor | None = None  # groups: [G, m] local rows (-1 pad); prompts: [P, n] others
    baseline: torch.Tensor | None = None  # groups: [G]
    chosen: torch.Tensor | None = None  # prompts: [P] local rows
    rejected: torch.Tensor | None = None  # prompts: [P] local rows
    units: np.ndarray | None = None  # rows per unit that a block may not split (None: any row)

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


def padded(lists: list[np.ndarray], width: int | None = None) -> np.ndarray:
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


# --- the layouts ---------------------------------------------------------------------------------
# Each: (cfg, rows [n] dataset rows to use, rewards [N_all], groups [N_all], pairs [P, 2] dataset
# rows or None, rng, batch_rows, group_size) -> (order [L] dataset row per laid-out row, batches).
# No Python loop per sample in the hot path: this runs once per training run.
Layout = Callable[..., tuple[np.ndarray, list[Batch]]]
_t = torch.as_tensor


def _rows(cfg: TrainConfig, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
          pairs: np.ndarray | None, rng: np.random.Generator, batch_rows: int, group_size: int
          ) -> tuple[np.ndarray, list[Batch]]:
    """Shuffled rows cut into batches of about batch_rows; a unit is a row."""
    order = rows[rng.permutation(len(rows))]
    n_b = max(1, round(len(order) / batch_rows))
    bounds = np.linspace(0, len(order), n_b + 1).round().astype(int)
    return order, [Batch(int(a), int(b), int(b - a),
                         rewards=_t(rewards[order[a:b]], dtype=torch.float32))
                   for a, b in zip(bounds[:-1], bounds[1:])]


def _groups(cfg: TrainConfig, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
            pairs: np.ndarray | None, rng: np.random.Generator, batch_rows: int, group_size: int
            ) -> tuple[np.ndarray, list[Batch]]:
    """Groups of up to group_size samples of one prompt (a unit), whole groups per batch; each
    group carries its reward baseline (cfg.baseline)."""
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
        idx = padded([np.arange(starts[i], starts[i + 1]) - s0 for i in range(a, b)])  # [G, m]
        rew = np.where(idx >= 0, rewards[order[s0 + np.maximum(idx, 0)]], 0.0)
        base = np.array([units[i][1] for i in range(a, b)])
        batches.append(Batch(s0, int(starts[b]), b - a, rewards=_t(rew, dtype=torch.float32),
                             index=_t(idx), baseline=_t(base, dtype=torch.float32),
                             units=np.diff(starts[a:b + 1])))
    return order, batches


def _usable_pairs(rows: np.ndarray, pairs: np.ndarray | None, rng: np.random.Generator
                  ) -> np.ndarray:
    """The pairs [P, 2] with both rows among `rows`, shuffled."""
    assert pairs is not None
    keep = np.isin(pairs[:, 0], rows) & np.isin(pairs[:, 1], rows)
    return pairs[keep][rng.permutation(int(keep.sum()))]  # [P, 2]


def _pairs(cfg: TrainConfig, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
           pairs: np.ndarray | None, rng: np.random.Generator, batch_rows: int, group_size: int
           ) -> tuple[np.ndarray, list[Batch]]:
    """Rows chosen, rejected, chosen, rejected, ...; a unit is a pair."""
    pr = _usable_pairs(rows, pairs, rng)
    order = pr.reshape(-1)
    per = max(1, batch_rows // 2)
    return order, [Batch(2 * a, 2 * min(a + per, len(pr)), min(a + per, len(pr)) - a,
                         units=np.full(min(a + per, len(pr)) - a, 2))
                   for a in range(0, len(pr), per)]


def _prompts(cfg: TrainConfig, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
             pairs: np.ndarray | None, rng: np.random.Generator, batch_rows: int,
             group_size: int) -> tuple[np.ndarray, list[Batch]]:
    """Whole prompts (a unit) that have a pair, each with its pairs and, for each pair, the
    prompt's other rows (index)."""
    pr = _usable_pairs(rows, pairs, rng)
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
        batches.append(Batch(s0, int(starts[b]), at, chosen=_t(np.concatenate(ch)),
                             rejected=_t(np.concatenate(rj)), index=_t(index),
                             units=np.diff(starts[a:b + 1])))
    return order, batches


LAYOUTS: dict[str, Layout] = {"rows": _rows, "groups": _groups, "pairs": _pairs,
                              "prompts": _prompts}


def layout(cfg: TrainConfig, rows: np.ndarray, rewards: np.ndarray, groups: np.ndarray,
           pairs: np.ndarray | None, rng: np.random.Generator, batch_rows: int, group_size: int
           ) -> tuple[np.ndarray, list[Batch]]:
    """Order the given rows as cfg's objective needs and cut batches: see LAYOUTS."""
    lay = LAYOUTS[objectives.get(cfg.objective).layout]
    return lay(cfg, rows, rewards, groups, pairs, rng, batch_rows, group_size)


# --- feature statistics and the standardised matrix -------------------------------------------------
def feature_stats(features: np.ndarray, rows: np.ndarray, chunk: int = 256
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the given rows -> float32 [D] x2.

    Cache-sized float32 chunks, float64 totals. The first chunk's mean is subtracted before
    squaring so that var = E[(x-k)^2] - E[x-k]^2 does not cancel when |mean| >> std."""
    rows = np.sort(rows)
    shift = torch.from_numpy(features[rows[:chunk]].astype(np.float32).mean(0))  # [D]
    lib = native.for_setup(features)
    if lib is not None:  # one pass in C
        s1, s2 = lib.column_sums(features, rows, shift.numpy(), threads.setup_threads())
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


def standardised(features: np.ndarray, order: np.ndarray, mean: np.ndarray | None,
                 std: np.ndarray | None, dtype: torch.dtype = torch.float32, chunk: int = 256
                 ) -> torch.Tensor:
    """features[order] as one tensor [L, D] of `dtype`, standardised in float32, built in
    cache-sized chunks."""
    out = torch.empty((len(order), features.shape[1]), dtype=dtype)  # [L, D]
    lib = native.for_setup(features)
    if lib is not None:  # one pass in C
        dim = features.shape[1]
        mean = np.zeros(dim, np.float32) if mean is None else mean
        inv = np.ones(dim, np.float32) if std is None else (1.0 / std).astype(np.float32)
        if not lib.standardise(features, order, mean, inv, out, threads.setup_threads()):
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


# --- from a rollouts folder ------------------------------------------------------------------------
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
    if objectives.get(objective).pairs:
        table = r.pairs
        if table is None or table.num_rows == 0:
            raise QProbeError(f"{where}: objective {objective} needs pairs.parquet "
                              "(preference pairs)")
        out["pairs"] = r.pair_rows()  # [P, 2]
    return out
