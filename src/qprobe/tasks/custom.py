"""Bring your own task: a JSONL file or a Python callable.

- JSONL {"id", "prompt", "tests"}: code; the program is prompt + completion + "\\n" + tests and it
  passes when it runs to the end in the sandbox.
- JSONL {"id", "prompt", "answer"}: a numeric answer (when the gold answer is a number: the last
  number in the completion, normalised) or else an exact answer (stripped strings equal).
- JSONL {"id", "prompt"} only (`load_jsonl_task(path, plain=True)`, what `qprobe collect` uses):
  prompts without a reward; rewards stay empty until `qprobe score` adds them.
- `module:function` or `path/to/file.py:function`: a reward function with the signature
  `f(prompts, completions, **columns) -> list[float | None]` (no prompts of its own; use it with
  `qprobe score`), or a `Task` subclass / instance for a full task.
Rows may carry a "split" field; without it every row is in split "all".
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig
from qprobe.tasks.base import Score, Task, check_columns, read_jsonl
from qprobe.tasks.code import CODE_STOP, CodeTask
from qprobe.tasks.gsm8k import AnswerTask, normalize


def _load_rows(path: Path, need: str | None) -> dict[str, list[dict]]:
    """The rows of a {"id", "prompt", need, "split"?} JSONL file by split (ids unique)."""
    splits: dict[str, list[dict]] = {}
    seen = set()
    for n, r in enumerate(read_jsonl(path), 1):
        missing = {"id", "prompt", *([need] if need else [])} - r.keys()
        if missing:
            raise QProbeError(f"{path}:{n}: missing field(s) {', '.join(sorted(missing))}")
        if not isinstance(r["prompt"], str):
            raise QProbeError(f"{path}:{n}: prompt must be a string")
        if need and not isinstance(r[need], str | int | float):
            raise QProbeError(f"{path}:{n}: prompt must be a string and {need} a string/number")
        row = dict(r, id=str(r["id"]))
        if row["id"] in seen:
            raise QProbeError(f"{path}:{n}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        splits.setdefault(str(r.get("split", "all")), []).append(row)
    if not splits:
        raise QProbeError(f"{path}: no rows")
    return splits


class _JsonlTask(Task):
    need: str | None = None

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self.description = f"custom task from {self.path.name}"
        self._splits = _load_rows(self.path, self.need)

    def splits(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._splits.items()}

    def _load(self, split: str) -> list[dict]:
        return self._splits[split]


class CustomCodeTask(_JsonlTask, CodeTask):
    need = "tests"
    stop = CODE_STOP

    def __init__(self, path: str | os.PathLike, sandbox: SandboxConfig | None = None):
        CodeTask.__init__(self, sandbox)
        _JsonlTask.__init__(self, path)

    def program(self, row: dict, completion: str) -> str:
        return row["prompt"] + completion + "\n" + str(row["tests"]) + "\n"


class CustomAnswerTask(_JsonlTask, AnswerTask):
    need = "answer"
    stop: list[str] = []

    def match(self, completion: str, answer: str) -> tuple[bool, str | None, str | None]:
        """Numbers compare after normalisation; other answers must equal the stripped text."""
        if normalize(str(answer)) is not None:
            return super().match(completion, answer)
        got, want = completion.strip(), str(answer).strip()
        return got == want, got, want


class PromptsTask(_JsonlTask):
    """A JSONL file of {"id", "prompt"} rows: prompts to sample, no reward (every score is
    "unscored")."""

    stop: list[str] = []

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        check_columns(self.name, prompts, completions, columns)
        return [Score(None, "unscored") for _ in prompts]


class CallableTask(Task):
    """A bare reward function: scores given completions; has no prompts of its own."""

    stop: list[str] = []

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.description = f"reward function {name}"

    def splits(self) -> dict[str, int]:
        return {}

    def prompts(self, split: str, limit: int | None = None) -> list[dict]:
        raise QProbeError(f"{self.name}: a reward function has no prompts; use it with `qprobe score`")

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        check_columns(self.name, prompts, completions, columns)
        rewards = list(self.fn(prompts, completions, **columns))
        if len(rewards) != len(prompts):
            raise QProbeError(f"{self.name}: returned {len(rewards)} rewards for {len(prompts)}")
        out = []
        for r in rewards:
            if r is None:
                out.append(Score(None, "unscored"))
            else:
                try:
                    out.append(Score(float(r), "scored"))
                except (TypeError, ValueError):
                    raise QProbeError(f"{self.name}: reward {r!r} is not a number") from None
        return out


def load_callable(spec: str, **kwargs) -> Task:
    """`module:function` / `file.py:function` -> a Task."""
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise QProbeError(f"task {spec}: no file {path}")
            modspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(modspec)
            sys.modules.setdefault(path.stem, module)
            modspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise QProbeError(f"task {spec}: cannot import {mod_name} ({e})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise QProbeError(f"task {spec}: {mod_name} has no attribute {attr!r}")
    if isinstance(obj, Task):
        return obj
    if inspect.isclass(obj) and issubclass(obj, Task):
        accepted = inspect.signature(obj).parameters
        return obj(**{k: v for k, v in kwargs.items() if k in accepted})
    if callable(obj):
        return CallableTask(obj, spec)
    raise QProbeError(f"task {spec}: {attr} is neither a Task nor a function")


def load_jsonl_task(path: Path, sandbox: SandboxConfig | None = None, plain: bool = False) -> Task:
    """Pick the custom task kind from the fields of the file's first row. plain: rows with only
    {"id", "prompt"} are a `PromptsTask` (else they are refused: a task needs a reward)."""
    rows = read_jsonl(path)
    if not rows:
        raise QProbeError(f"{path}: no rows")
    if "tests" in rows[0]:
        return CustomCodeTask(path, sandbox)
    if "answer" in rows[0]:
        return CustomAnswerTask(path)
    if "chosen" in rows[0] and "rejected" in rows[0]:
        from qprobe.tasks.preference import Preferences

        return Preferences(path)
    if plain:
        return PromptsTask(path)
    raise QProbeError(
        f"{path}: rows need 'tests' (code), 'answer' (exact/numeric) or 'chosen'+'rejected'"
    )
