"""Where the execution stages write: a rollouts folder's columns and its signals.json (costs),
both under the folder's writer lock. Shared by signals.py and gentests.py."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qprobe.fileio import atomic_write_json

COST_FILE = "signals.json"


@contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """The rollouts folder's writer lock (the one RolloutWriter appends under)."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_columns(path: Path, updates: dict[str, dict[tuple[str, int], Any]]) -> None:
    """Set `updates[column][(prompt_id, sample_idx)] = value` in the folder's shards, keeping
    every other value (null for rows not given and not stored); under the folder's lock, with the
    store re-read inside it so columns written by another process meanwhile are kept."""
    from qprobe.rollouts import Rollouts

    with _folder_lock(path):
        r = Rollouts(path)
        keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
        cols = {}
        for name, upd in updates.items():
            cur = r.column(name) if name in r.table.column_names else [None] * len(keys)
            cols[name] = [upd.get(k, v) for k, v in zip(keys, cur)]
        rewards = [None if x != x else float(x) for x in r.rewards]
        r.set_rewards(rewards, extra_columns=cols)


def add_cost(path: Path, stage: str, **amounts: float) -> dict[str, Any]:
    """Add `amounts` (seconds, prompts, programs, tokens, ...) to `stage` in signals.json."""
    f = path / COST_FILE
    with _folder_lock(path):
        cost = json.loads(f.read_text()) if f.is_file() else {}
        st = cost.setdefault(stage, {})
        for k, v in amounts.items():
            st[k] = round(st.get(k, 0) + v, 3)
        if st.get("prompts"):
            st["seconds_per_prompt"] = round(st["seconds"] / st["prompts"], 4)
            if "tokens" in st:
                st["tokens_per_prompt"] = round(st["tokens"] / st["prompts"], 1)
        atomic_write_json(f, cost)
    return cost
