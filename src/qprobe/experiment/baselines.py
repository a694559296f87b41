"""The baselines an experiment compares probes with, besides pass@1 and pass@k.

- greedy: one greedy completion per test prompt (collected by `qprobe.collect` with k = 1,
  temperature 0; see `run.collect_baselines`);
- few-shot on successes: `n` successful train completions (from distinct prompts) put before the
  test prompt as worked examples, then one greedy completion (`pick_shots`, `few_shot_prefix`,
  `collect_with_prefix`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


def pick_shots(train_dir: Path, n: int, seed: int, stored: str | None = None
               ) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs with the best reward, from distinct train prompts (seeded).

    stored: the prefix an existing few-shot folder was collected with. When the train set grew
    since, the seeded choice differs and the folder would be refused on resume; its own shots
    are kept instead, if they are still train samples and as many as a new choice gives."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(train_dir)
    shots = _pick(r, n, seed)
    if stored is not None and few_shot_prefix(shots) != stored:
        kept = _shots_in(r, stored)
        if kept is not None and len(kept) == len(shots):
            return kept
    return shots


def _shots_in(r: Any, prefix: str) -> list[tuple[str, str]] | None:
    """The train samples a few-shot prefix is made of, in its order (read from its start, the
    longest sample text that fits at each point); None if it is not made of them."""
    texts = {few_shot_prefix([(p, c)]): (p, c) for p, c in zip(r.column("prompt"), r.column("completion"))}
    shots, pos = [], 0
    while pos < len(prefix):
        t = max((t for t in texts if prefix.startswith(t, pos)), key=len, default=None)
        if t is None:
            return None
        shots.append(texts[t])
        pos += len(t)
    return shots


def _pick(r: Any, n: int, seed: int) -> list[tuple[str, str]]:
    rewards = r.rewards
    if np.isnan(rewards).all():
        return []
    best = np.nanmax(rewards)
    if best <= 0:
        return []
    ok = np.flatnonzero(rewards == best)
    rng = np.random.default_rng([seed, 1])
    pids, prompts, comps = r.prompt_ids, r.column("prompt"), r.column("completion")
    shots, seen = [], set()
    for i in rng.permutation(ok):
        if pids[i] in seen:
            continue
        seen.add(pids[i])
        shots.append((prompts[i], comps[i]))
        if len(shots) == n:
            break
    return shots


def few_shot_prefix(shots: list[tuple[str, str]]) -> str:
    """Text put before a test prompt: each solved example as prompt, newline, completion."""
    return "".join(f"{p.rstrip()}\n{c.strip()}\n\n" for p, c in shots)


def collect_with_prefix(model: Any, task: Any, split: str, out_dir: Path, params: Any,
                        limit: int | None, prefix: str, say: Any) -> None:
    """One completion per prompt with `prefix` put before the prompt (the few-shot baseline),
    through the one collection loop (resumable, scored against the original prompt)."""
    from qprobe.collect import collect_task

    collect_task(model, task, split, out_dir, k=1, params=params, limit=limit, prefix=prefix,
                 batch_prompts=max(1, min(128, model.max_batch_rows)), progress=False, say=say)


def baseline_entry(path: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean reward of a baseline's rollouts (one completion per prompt) with its bootstrap CI."""
    from qprobe.evaluate import Estimate
    from qprobe.rollouts import Rollouts

    r = Rollouts(path).rewards
    r = r[~np.isnan(r)].astype(np.float64)
    return dataclasses.asdict(Estimate.of(r, n_boot, seed))
