"""`qprobe score`: compute rewards for given completions, or (re)fill a rollouts folder's rewards."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobe.commands.flags import add_flags, from_args


@dataclass
class ScoreOptions:
    input: str = field(default="", metadata={
        "positional": True, "metavar": "INPUT", "help": "completions .jsonl or rollouts folder"})
    task: str = field(default="", metadata={
        "required": True, "help": "task name, task .jsonl, or module:function"})
    split: str | None = field(default=None, metadata={
        "help": "check that every prompt_id belongs to this split"})
    data: str | None = field(default=None, metadata={
        "help": "data folder for the task (default: $QPROBE_DATA, ...)"})
    out: str | None = field(default=None, metadata={
        "help": "output .jsonl ('-' = stdout; default INPUT.scored.jsonl)"})
    timeout: float = field(default=3.0, metadata={"help": "seconds per program"})
    workers: int = field(default=0, metadata={"help": "sandbox workers; 0 = 2 x cores"})
    visible: bool = field(default=False, metadata={
        "help": "instead of the reward, run only the tests each prompt shows (MBPP's first assert, "
                "HumanEval's docstring examples) and store 1/0 as visible_reward (empty where a "
                "prompt shows none): a signal available at inference time, a probe input"})
    only_missing: bool = field(default=False, metadata={
        "help": "rollouts folder only: score only the samples without a value (no reward; with "
                "--visible, no visible_reward column in their shard) and keep the others, e.g. "
                "after the folder grew"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score completions (JSONL or a rollouts folder) with a task's reward",
        description="Score completions with TASK's reward. INPUT is a JSONL file of rows "
        '{"prompt_id", "completion"} (other fields are kept; "prompt" is looked up when '
        "missing): each row is written back with its reward, status (passed / failed / "
        "timeout / error / sandbox_error for code) and detail. Or INPUT is a rollouts folder: "
        "its reward column and verdict column are filled in or refreshed in place.",
    )
    add_flags(p, ScoreOptions)
    p.set_defaults(func=run)


def _read_rows(path: Path) -> list[dict]:
    from qprobe.errors import QProbeError
    from qprobe.tasks.base import read_jsonl

    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if "prompt_id" not in r or not isinstance(r.get("completion"), str):
            raise QProbeError(f"{path}:{n}: each row needs prompt_id and a string completion")
    if not rows:
        raise QProbeError(f"{path}: no rows to score")
    return rows


def run(args: argparse.Namespace) -> int:
    from qprobe.errors import QProbeError
    from qprobe.sandbox import SandboxConfig
    from qprobe.tasks import get_task

    o = from_args(ScoreOptions, args)
    src = Path(o.input)
    if not src.exists():
        raise QProbeError(f"score: {src} does not exist")
    if o.only_missing and not src.is_dir():
        raise QProbeError(f"score: --only-missing needs a rollouts folder, {src} is a file")
    task = get_task(o.task, data=o.data,
                    sandbox=SandboxConfig(timeout=o.timeout, workers=o.workers))  # fmt: skip
    store, todo = None, None
    if src.is_dir():
        from qprobe.rollouts import Rollouts

        store = Rollouts(src)
        ids = [str(x) for x in store.prompt_ids]
        rows = [
            {"prompt_id": pid, "prompt": p, "completion": c}
            for pid, p, c in zip(ids, store.column("prompt"), store.column("completion"))
        ]
        if o.only_missing:
            missing = store.lacks_column("visible_reward") if o.visible else _isnan(store.rewards)
            todo = [i for i, m in enumerate(missing) if m]
            if not todo:
                task.close()
                print(f"score: every sample of {src} has a value; nothing to do", file=sys.stderr)
                return 0
            rows = [rows[i] for i in todo]
    else:
        rows = _read_rows(src)
    ids = [str(r["prompt_id"]) for r in rows]
    if o.split:
        wanted = {r["id"] for r in task.prompts(o.split)}
        bad = [i for i in ids if i not in wanted]
        if bad:
            raise QProbeError(f"score: prompt_id {bad[0]!r} is not in {task.name} split {o.split}")
    if o.visible:
        return _visible(task, rows, ids, store, src, o.out, todo)
    scores = _score(task, rows, ids)
    if store is not None:
        cols = {"reward": [s.reward for s in scores], "verdict": [s.status for s in scores],
                "verdict_detail": [s.detail for s in scores]}
        if todo is not None:  # the stored values, with the new ones in their rows
            cols = {name: _fill(store, name, todo, vals) for name, vals in cols.items()}
        store.set_rewards(cols.pop("reward"), extra_columns=cols)
        where = str(src)
    else:
        where = _write_rows(rows, scores, src, o.out)
    counts: dict[str, int] = {}
    for s in scores:
        counts[s.status] = counts.get(s.status, 0) + 1
    scored = [s.reward for s in scores if s.reward is not None]
    mean = f"{sum(scored) / len(scored):.4f}" if scored else "n/a"
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"scored {len(scores)} completions -> {where}: mean reward {mean} ({summary})",
          file=sys.stderr)  # fmt: skip
    return 0


def _isnan(values: Any) -> list[bool]:
    return [x != x for x in values.tolist()]


def _fill(store: Any, name: str, todo: list[int], values: list) -> list:
    """Column `name` of the folder (None where absent) with `values` put at rows `todo`."""
    if name == "reward":
        col = [None if x != x else x for x in store.rewards.tolist()]
    else:
        col = store.column(name) if name in store.table.column_names else [None] * len(store)
    for i, v in zip(todo, values):
        col[i] = v
    return col


def _visible(task: Any, rows: list[dict], ids: list[str], store: Any, src: Path,
             out: str | None, todo: list[int] | None = None) -> int:
    """`--visible`: the visible-test verdict of every row, into the folder or the output rows."""
    from qprobe.errors import QProbeError
    from qprobe.fileio import atomic_write_text
    from qprobe.tasks.code import CodeTask

    if not isinstance(task, CodeTask):
        raise QProbeError(f"score --visible: task {task.name!r} has no tests to show (code tasks only)")
    prompts = [r.get("prompt") or task.row(pid)["prompt"] for r, pid in zip(rows, ids)]
    try:
        vis = task.visible_reward(prompts, [r["completion"] for r in rows], prompt_id=ids)
    finally:
        task.close()
    if store is not None:
        col = vis if todo is None else _fill(store, "visible_reward", todo, vis)
        store.set_rewards([None if x != x else float(x) for x in store.rewards],
                          extra_columns={"visible_reward": col})
        where = str(src)
    else:
        text = "".join(json.dumps(dict(r, visible_reward=v), ensure_ascii=False) + "\n"
                       for r, v in zip(rows, vis))
        if out == "-":
            sys.stdout.write(text)
            where = "stdout"
        else:
            dest = Path(out) if out else src.with_name(src.name.split(".")[0] + ".visible.jsonl")
            atomic_write_text(dest, text)
            where = str(dest)
    shown = [v for v in vis if v is not None]
    rate = f"{sum(shown) / len(shown):.4f}" if shown else "n/a"
    print(f"visible tests of {len(vis)} completions -> {where}: {len(shown)} with shown tests, "
          f"pass rate {rate}", file=sys.stderr)
    return 0


def _score(task: Any, rows: list[dict], ids: list[str]) -> list:
    """The task's `Score` of each row (prompts looked up by id where a row has none), with a
    progress bar; closes the task."""
    from tqdm import tqdm

    from qprobe.errors import QProbeError
    from qprobe.tasks.code import CodeTask

    prompts = []
    for r, pid in zip(rows, ids):
        p = r.get("prompt")
        if p is None:
            try:
                p = task.row(pid)["prompt"]
            except (QProbeError, NotImplementedError):
                p = ""
        prompts.append(p)
    kw = {}
    bar = tqdm(total=len(rows), desc=f"scoring ({task.name})", unit="completion", file=sys.stderr)
    if isinstance(task, CodeTask):
        kw["progress"] = bar.update
    try:
        return task.score(prompts, [r["completion"] for r in rows], prompt_id=ids, **kw)
    finally:
        if not kw:
            bar.update(len(rows))
        bar.close()
        task.close()


def _write_rows(rows: list[dict], scores: list, src: Path, out: str | None) -> str:
    """Write each row with its reward, status and detail as JSONL; returns where it went."""
    from qprobe.fileio import atomic_write_text

    out_rows = [dict(r, reward=s.reward, status=s.status, detail=s.detail)
                for r, s in zip(rows, scores)]  # fmt: skip
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
    if out == "-":
        sys.stdout.write(text)
        return "stdout"
    dest = Path(out) if out else src.with_name(src.name.split(".")[0] + ".scored.jsonl")
    atomic_write_text(dest, text)
    return str(dest)
