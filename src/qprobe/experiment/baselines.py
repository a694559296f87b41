"""The baselines an experiment compares probes with, besides pass@1 and pass@k.

- greedy: one greedy completion per test prompt (collected by `qprobe.collect` with k = 1,
  temperature 0; see `run.collect_baselines`);
- few-shot on successes: `n` successful train completions (from distinct prompts) put before the
  test prompt as worked examples, then one greedy completion (`pick_shots`, `few_shot_prefix`,
  `collect_with_prefix`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np


def pick_shots(train_dir: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs with the best reward, from distinct train prompts (seeded)."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(train_dir)
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


# merge: replace with qprobe.collect.collect_task
def collect_with_prefix(
    model: Any,
    task: Any,
    split: str,
    out_dir: Path,
    params: Any,
    limit: int | None,
    prefix: str,
    say: Any,
) -> None:
    """One completion per prompt with `prefix` put before the prompt (the few-shot baseline).

    `qprobe.collect` samples a task's own prompts; this is the same loop (resumable, one shard
    per batch, scored by the task against the original prompt) for prompts with a prefix.
    """
    from qprobe.rollouts import RolloutWriter

    rows = task.prompts(split, limit=limit)
    meta = {"task": task.name, "split": split, "k": 1, "sampling": params.to_dict(),
            "prefix": prefix, "model": getattr(model, "name", "")}  # fmt: skip
    w = RolloutWriter(out_dir, meta=meta, feature_spec=model.feature_spec)
    todo = [r for r in rows if (str(r["id"]), 0) not in w.done]
    if not todo:
        say(f"{out_dir.name}: {len(rows)} prompts x 1 already collected")
        return
    t0 = time.perf_counter()
    per_batch = max(1, min(128, getattr(model, "max_batch_rows", 16)))  # one row per prompt
    for i in range(0, len(todo), per_batch):
        chunk = todo[i : i + per_batch]
        samples = model.sample([prefix + r["prompt"] for r in chunk], 1, params)
        out_rows = [
            {"prompt_id": str(r["id"]), "sample_idx": 0, "prompt": r["prompt"],
             "completion": g[0].text, "finish_reason": g[0].finish_reason}
            for r, g in zip(chunk, samples)
        ]  # fmt: skip
        columns = {c: [r.get(c) for r in chunk] for c in chunk[0] if c not in ("id", "prompt")}
        rewards = task.reward([r["prompt"] for r in chunk], [o["completion"] for o in out_rows],
                              prompt_id=[o["prompt_id"] for o in out_rows], **columns)  # fmt: skip
        for o, rew in zip(out_rows, rewards):
            o["reward"] = None if rew is None else float(rew)
        feats = None if model.feature_spec is None else np.stack([g[0].feature for g in samples])
        w.append(out_rows, feats)
    say(f"{out_dir.name}: {len(todo)} prompts in {time.perf_counter() - t0:.0f}s")


def baseline_entry(path: Path, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean reward of a baseline's rollouts (one completion per prompt) with its bootstrap CI."""
    from qprobe.evaluate import Estimate
    from qprobe.rollouts import Rollouts

    r = Rollouts(path).rewards
    r = r[~np.isnan(r)].astype(np.float64)
    return dataclasses.asdict(Estimate.of(r, n_boot, seed))
