"""Choosing a probe's inputs and regularisation by cross-validation over training prompts.

Small data is where users live, and a probe on a wide hidden state overfits it: on the MBPP/Qwen
run the probes rank the training prompts' samples far better than the test prompts'. `qprobe train
--cv N` therefore picks, among candidate settings, the one whose probes choose best on prompts they
were not trained on:

- inputs: each complete feature set of the folder (`L19-last`, `L12-mean`, ... from `qprobe
  embed`), with or without the log-likelihood extras, and the extras alone;
- signals: groups of free per-candidate signals a folder stores (`signals`: e.g. the reviewer
  likelihood, execution agreement), each group tried beside every other input;
- regularisation: weight decay x optimiser steps;
- the objective itself (`objectives`): the probe a user gets is the objective CV picks, not the
  one that scored best on test.

Folds are whole prompts (every sample of a prompt is in one fold). The score of a setting is the
selection reward the policy gets: the mean over held-out prompts of the expected reward of
softmax(Q/beta) over that prompt's samples (argmax at beta = 0). For the pair objectives (bt,
dpo), which have preferences instead of rewards, it is the held-out pair accuracy: per prompt the
share of its pairs whose chosen answer the probe scores higher, averaged over prompts. Only rows
of the training folder are ever read, and for each fold the probe (standardisation statistics
included) is fitted on the other folds (and their pairs) alone. The chosen setting is then trained on every training row, and the table
and the choice are stored in the probe's config.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.probe import LOGLIK_EXTRAS, build_inputs

LOGLIK = list(LOGLIK_EXTRAS)  # the extras a "+loglik" candidate adds


@dataclass
class CVGrid:
    """The candidate settings (each list is one axis of the grid)."""

    feature_sets: list[str] | None = field(default=None, metadata={
        "help": "feature sets to try (default: every complete set of the folder)"})
    loglik: list[str] = field(default_factory=lambda: ["without", "with", "only"], metadata={
        "help": "log-likelihood extras: without, with (beside the features), only (no features); "
                "with/only need log-likelihoods in the folder (qprobe embed)"})
    visible: list[str] = field(default_factory=lambda: ["without", "with"], metadata={
        "help": "the visible-test input (passes the tests the prompt shows): without, with; "
                "with needs a `visible_reward` column (qprobe score --visible)"})
    weight_decay: list[float] = field(default_factory=lambda: [0.0, 0.1], metadata={
        "help": "weight decay values to try"})
    min_steps: list[int] = field(default_factory=lambda: [1000, 10000], metadata={
        "help": "optimiser step counts to try (fewer steps: a probe closer to its zero start)"})
    beta: list[float] | None = field(default=None, metadata={
        "help": "policy temperatures to try (default: the training config's beta alone): each "
                "fitted probe is scored at every one (no refit; 0 = argmax), and the chosen beta "
                "becomes the probe's own, the policy's default"})
    lr: list[float] | None = field(default=None, metadata={
        "help": "learning rates to try (default: the training config's alone); with Adam a "
                "weight moves at most about lr per step, so lr x steps bounds how decisive a "
                "strong single input (the visible test) can become at a small beta"})
    signals: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "groups of extra inputs to try beside the others, each 'none' or names of "
                "qprobe.probe.EXTRAS joined by '+' (e.g. none, mbr_share+codet_score)"})
    gate: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "gates to try: none, or an extra in qprobe.probe.GATES (visible_pass): the "
                "candidates that pass it always come first and the probe, trained on the rows "
                "that do not fail it, ranks inside (the shown-test filter with a learned order)"})
    objectives: list[str] | None = field(default=None, metadata={
        "help": "objectives to try (default: the training config's alone); all reward "
                "objectives or all pair objectives, since they are scored differently"})


@dataclass(frozen=True)
class Candidate:
    """One setting: which inputs, which regularisation."""

    feature_set: str | None  # None: no hidden-state features
    extras: tuple[str, ...]
    weight_decay: float
    min_steps: int
    lr: float | None = None  # None: the training config's
    beta: float | None = None  # the policy temperature it is scored at; None: the config's
    objective: str | None = None  # None: the training config's
    gate: str | None = None  # an extra whose passing candidates come first (qprobe.probe.GATES)

    @property
    def label(self) -> str:
        named = {*LOGLIK, "visible_pass"}
        inputs = "+".join(([self.feature_set] if self.feature_set else []) +
                          (["loglik"] if set(LOGLIK) & set(self.extras) else []) +
                          (["visible"] if "visible_pass" in self.extras else []) +
                          [e for e in self.extras if e not in named] +
                          ([f"gate({self.gate})"] if self.gate else []))
        return (("" if self.objective is None else f"{self.objective}: ")
                + f"{inputs} wd={self.weight_decay:g} steps={self.min_steps}"
                + ("" if self.lr is None else f" lr={self.lr:g}")
                + ("" if self.beta is None else f" beta={self.beta:g}"))


def candidates(r: Any, grid: CVGrid) -> list[Candidate]:
    """The grid over a rollouts folder's available inputs."""
    sets = list(r.feature_sets)
    chosen = grid.feature_sets or sets
    missing = [s for s in chosen if s not in sets]
    if missing:
        raise QProbeError(f"--cv: no feature set(s) {missing} in {r.path} (have {sets})")
    has_ll = r.loglik() is not None
    bad = [m for m in grid.loglik if m not in ("without", "with", "only")]
    if bad:
        raise QProbeError(f"--cv: loglik options are without, with, only; got {bad}")
    if not has_ll and any(m != "without" for m in grid.loglik):
        if grid.loglik != ["without", "with", "only"]:  # asked for explicitly
            raise QProbeError(f"--cv: {r.path} has no log-likelihoods; run `qprobe embed` on it")
    inputs: list[tuple[str | None, tuple[str, ...]]] = []
    for mode in grid.loglik:
        if mode == "without":
            inputs += [(s, ()) for s in chosen]
        elif mode == "with" and has_ll:
            inputs += [(s, tuple(LOGLIK)) for s in chosen]
        elif mode == "only" and has_ll:
            inputs.append((None, tuple(LOGLIK)))
    bad = [m for m in grid.visible if m not in ("without", "with")]
    if bad:
        raise QProbeError(f"--cv: visible options are without, with; got {bad}")
    has_vis = "visible_pass" in r.extra_inputs()
    if not has_vis and "with" in grid.visible and grid.visible != ["without", "with"]:
        raise QProbeError(f"--cv: {r.path} has no visible_reward column; run `qprobe score "
                          "--visible` on it")
    if has_vis and "with" in grid.visible:
        with_vis = [(fs, (*ex, "visible_pass")) for fs, ex in inputs]
        inputs = with_vis + inputs if "without" in grid.visible else with_vis
    groups = signal_groups(grid.signals, r.extra_inputs())
    inputs = [(fs, (*ex, *g)) for g in groups for fs, ex in inputs]
    lrs: list[float | None] = [None] if not grid.lr else [float(x) for x in grid.lr]
    objs: list[str | None] = [None] if not grid.objectives else list(grid.objectives)
    gates = gate_options(grid.gate, r.extra_inputs())
    out = []
    for o, gate, (fs, ex), wd, st, lr in itertools.product(objs, gates, inputs, grid.weight_decay,
                                                           grid.min_steps, lrs):
        if gate is not None and gate not in ex:
            ex = (*ex, gate)  # the gate is read from the probe's inputs
        c = Candidate(fs, ex, float(wd), int(st), lr, objective=o, gate=gate)
        if c not in out:  # a gate already among the inputs makes the same candidate twice
            out.append(c)
    return out


def gate_options(spec: list[str], columns: dict[str, Any]) -> list[str | None]:
    """The `gate` axis: None for 'none', else a name from qprobe.probe.GATES the folder stores."""
    from qprobe.probe import GATES

    out: list[str | None] = []
    for g in spec or ["none"]:
        if g == "none":
            out.append(None)
        elif g not in GATES:
            raise QProbeError(f"--cv: gate must be none or one of {list(GATES)}, got {g!r}")
        elif g not in columns:
            raise QProbeError(f"--cv: gate {g} needs a column the folder lacks (qprobe score "
                              "--visible)")
        else:
            out.append(g)
    return out


def signal_groups(spec: list[str], columns: dict[str, Any]) -> list[tuple[str, ...]]:
    """The `signals` axis as tuples of extra names ('none' -> ()), each checked against
    qprobe.probe.EXTRAS and the folder's stored columns."""
    from qprobe.probe import EXTRAS

    groups = []
    for item in spec or ["none"]:
        names = () if item == "none" else tuple(n for n in item.split("+") if n)
        bad = [n for n in names if n not in EXTRAS]
        if bad:
            raise QProbeError(f"--cv: unknown signal(s) {bad}; known: {list(EXTRAS)}")
        missing = [n for n in names if n not in columns]
        if missing:
            raise QProbeError(f"--cv: the folder stores no {missing} (see docs/verifier.md)")
        groups.append(names)
    return groups


def prompt_folds(group: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index [N] of each row: prompts shuffled with `seed`, dealt into `folds` folds."""
    n_groups = int(group.max()) + 1
    if folds < 2 or folds > n_groups:
        raise QProbeError(f"--cv: need 2 <= folds <= number of prompts ({n_groups}), got {folds}")
    order = np.random.default_rng(seed).permutation(n_groups)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    fold_of_group[order] = np.arange(n_groups) % folds
    return fold_of_group[group]


def selection_reward(scores: np.ndarray, rewards: np.ndarray, group: np.ndarray, beta: float) -> float:
    """Mean over prompts of the expected reward of softmax(Q/beta) over the prompt's samples."""
    from qprobe.policy import expected_reward

    ok = ~np.isnan(rewards)
    vals = []
    for g in np.unique(group[ok]):
        m = ok & (group == g)
        vals.append(float(expected_reward(scores[m], rewards[m], beta)))
    return float(np.mean(vals))


def held_out_pair_accuracy(group: np.ndarray, q: np.ndarray) -> float:
    """Mean over prompts of the share of their pairs ranked right (ties: one half); `q` [P, 2]
    holds the (chosen, rejected) scores of pairs whose prompts are `group` [P]."""
    if len(q) == 0:
        raise QProbeError("--cv: a fold has no pairs; use fewer folds")
    hit = (q[:, 0] > q[:, 1]) + 0.5 * (q[:, 0] == q[:, 1])  # [P]
    g = np.unique(group, return_inverse=True)[1]
    return float(np.mean(np.bincount(g, hit) / np.bincount(g)))


def _inputs(r: Any, c: Candidate) -> np.ndarray:
    feats = r.features_of(c.feature_set) if c.feature_set else None
    return build_inputs(feats, r.extra_inputs() if c.extras else None, c.extras)


def fit(r: Any, c: Candidate, base: Any, rows: np.ndarray | None = None,
        x: np.ndarray | None = None, **kw: Any):
    """Train `base` (a TrainConfig) with candidate `c` on `rows` of rollouts `r` (all: None);
    `x` is the candidate's input matrix when the caller has built it already."""
    from qprobe.train import objectives, train_probe

    x = _inputs(r, c) if x is None else x
    group, _ = r.groups()
    rewards = r.rewards
    pids = r.prompt_ids
    objective = base.objective if c.objective is None else c.objective
    pairs = r.pair_rows() if objectives.get(objective).pairs else None  # [P, 2]
    if c.gate is not None:  # train on the rows that do not fail the gate: the probe ranks there
        # the gate is one of the input matrix's extra columns: read it there, not from the
        # folder again (fit runs once per fold and candidate)
        keep = x[:, x.shape[1] - len(c.extras) + c.extras.index(c.gate)] != 0  # [N]
        rows = np.flatnonzero(keep) if rows is None else rows[keep[rows]]
    if rows is not None:
        x, group, rewards, pids = x[rows], group[rows], rewards[rows], pids[rows]
        if pairs is not None:  # keep the pairs with both rows in `rows`, renumbered
            new = np.full(len(r), -1, dtype=np.int64)
            new[rows] = np.arange(len(rows))
            pairs = new[pairs]
            pairs = pairs[(pairs >= 0).all(axis=1)]
    cfg = dataclasses.replace(base, weight_decay=c.weight_decay, min_steps=c.min_steps,
                              lr=base.lr if c.lr is None else c.lr,
                              objective=base.objective if c.objective is None else c.objective)
    spec = r.feature_sets[c.feature_set] if c.feature_set else None
    probe, history = train_probe(x, rewards, group, pairs, cfg, feature_spec=spec, extras=c.extras,
                                 prompt_ids=pids, **kw)
    probe.gate = c.gate
    if c.beta is not None:  # the temperature CV chose for the policy (training used cfg.beta)
        probe.beta = float(c.beta)
    return probe, history


def cross_validate(r: Any, base: Any, grid: CVGrid | None = None, folds: int = 5, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every candidate by `folds`-fold CV over the prompts of `r`; returns the table.

    {"folds", "seed", "beta", "rows": [{"label", "candidate", "mean", "se", "per_fold"}],
     "best": index into rows (highest mean; ties: the simpler, earlier candidate)}. With
    `grid.beta`, each fitted probe is scored at every beta: one row per (setting, beta)."""
    from qprobe.train import objectives

    say = log or (lambda s: None)
    group, _ = r.groups()
    fold = prompt_folds(group, folds, seed)
    rewards = r.rewards
    grid = grid or CVGrid()
    cands = candidates(r, grid)
    kinds = {objectives.get(o).pairs for o in (grid.objectives or [base.objective])}
    if len(kinds) > 1:
        raise QProbeError("--cv: objectives mix pair objectives (scored by pair accuracy) with "
                          "reward objectives (scored by selection reward); CV them apart")
    pairs = r.pair_rows() if kinds.pop() else None  # [P, 2]
    if pairs is not None and grid.beta:
        raise QProbeError("--cv-beta: pair objectives are scored by held-out pair accuracy, "
                          "which does not depend on the policy's beta")
    betas: list[float | None] = [None] if not grid.beta else [float(b) for b in grid.beta]
    if any(b is not None and b < 0 for b in betas):
        raise QProbeError(f"--cv: beta values must be >= 0, got {grid.beta}")
    say(f"cv: {len(cands)} candidates x {folds} folds over {int(group.max()) + 1} prompts"
        + (f", each scored at beta {grid.beta}" if grid.beta else ""))
    table = []
    t0 = time.perf_counter()
    for i, c in enumerate(cands):
        x_all = _inputs(r, c)
        per_fold: dict[float | None, list[float]] = {b: [] for b in betas}
        for f in range(folds):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            probe, _ = fit(r, c, base, tr, x=x_all, data_fingerprint=False)
            if pairs is not None:  # held-out pair accuracy: pairs of the fold's prompts
                held = pairs[fold[pairs[:, 0]] == f]  # [P_f, 2]
                q = probe.score(x_all[held.ravel()]).astype(np.float64).reshape(-1, 2)
                per_fold[None].append(held_out_pair_accuracy(group[held[:, 0]], q))
                continue
            s = probe.score(x_all[te]).astype(np.float64)
            for b in betas:
                per_fold[b].append(selection_reward(s, rewards[te], group[te],
                                                    base.beta if b is None else b))
        for b in betas:
            cb = dataclasses.replace(c, beta=b)
            m = float(np.mean(per_fold[b]))
            se = float(np.std(per_fold[b], ddof=1) / np.sqrt(folds))
            table.append({"label": cb.label, "candidate": dataclasses.asdict(cb), "mean": m,
                          "se": se, "per_fold": per_fold[b]})
            say(f"cv [{i + 1}/{len(cands)}] {cb.label}: {m:.4f} +- {se:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    best = int(np.argmax([row["mean"] for row in table]))
    return {"folds": folds, "seed": seed, "beta": base.beta, "rows": table, "best": best}


def train_with_cv(r: Any, base: Any, grid: CVGrid | None = None, folds: int = 5, seed: int = 0,
                  log: Callable[[str], None] | None = None):
    """Cross-validate, then train the best candidate on every row of `r`: (probe, history)."""
    say = log or (lambda s: None)
    cv = cross_validate(r, base, grid, folds, seed, log)
    best = cv["rows"][cv["best"]]
    c = Candidate(**{**best["candidate"], "extras": tuple(best["candidate"]["extras"])})
    say(f"cv: chose {c.label} ({best['mean']:.4f} +- {best['se']:.4f})")
    probe, history = fit(r, c, base, log=log)
    probe.info["cv"] = {**cv, "chosen": c.label}
    return probe, history
