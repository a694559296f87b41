"""What a task is: prompts for a split, stop sequences and a reward.

Every task gives `score(prompts, completions, **columns) -> list[Score]` (reward plus a status
saying why); `reward(...)` is the list of `Score.reward` (None: could not be scored). Columns are
lists aligned with `prompts` and always include `prompt_id`. Code tasks score in the sandbox.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.fileio import cache_root


@dataclass
class Score:
    """The reward for one completion and why. status: passed / failed / timeout / error /
    sandbox_error for code; passed / failed for answers; unscored when there is no reward."""

    reward: float | None
    status: str
    detail: str = ""


class Task:
    """A data set of prompts with a reward. Subclasses set `name`, `stop` and implement
    `splits`, `_load(split)` (all rows of a split) and `score`."""

    name: str = ""
    description: str = ""
    stop: list[str] = []

    def splits(self) -> dict[str, int]:
        """Split name -> number of prompts."""
        raise NotImplementedError

    def _load(self, split: str) -> list[dict]:
        raise NotImplementedError

    def prompts(self, split: str, limit: int | None = None) -> list[dict]:
        """Rows {"id": str, "prompt": str, ...columns the reward needs} of a split, in order."""
        self._check_split(split)
        rows = self._load(split)
        return rows if limit is None else rows[:limit]

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        raise NotImplementedError

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        """Reward per completion; None where it could not be scored."""
        return [s.reward for s in self.score(prompts, completions, **columns)]

    def row(self, prompt_id: str) -> dict:
        """The data row of a prompt id (any split); QProbeError if unknown."""
        if not hasattr(self, "_index"):
            self._index = {r["id"]: r for split in self.splits() for r in self._load(split)}
        try:
            return self._index[str(prompt_id)]
        except KeyError:
            raise QProbeError(f"{self.name}: unknown prompt_id {prompt_id!r}") from None

    def close(self) -> None:
        """Release resources (e.g. the sandbox's worker processes)."""

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise QProbeError(
                f"{self.name}: no split {split!r}; splits are {', '.join(self.splits())}"
            )

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def check_columns(task: str, prompts: list, completions: list, columns: dict) -> None:
    """All inputs to a reward must be aligned lists."""
    if len(prompts) != len(completions):
        raise QProbeError(
            f"{task}: {len(prompts)} prompts but {len(completions)} completions"
        )
    for k, v in columns.items():
        if v is not None and len(v) != len(prompts):
            raise QProbeError(f"{task}: column {k!r} has {len(v)} values for {len(prompts)} prompts")


# ---------------------------------------------------------------- data files

ENV_VAR = "QPROBE_DATA"


def cache_dir() -> Path:
    """Where `qprobe tasks download` puts data: `data/` in the qprobe cache
    (`qprobe.fileio.cache_root()`: $QPROBE_CACHE, else ~/.cache/qprobe)."""
    return cache_root() / "data"


def data_roots(data: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for data files, in order: the explicit path (--data / constructor),
    $QPROBE_DATA, ../shared/data from the current directory, the user cache."""
    if data is not None:
        return [Path(data)]
    roots = []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots += [Path.cwd().parent / "shared" / "data", cache_dir()]
    return roots


def find_data(task: str, rel: str, data: str | os.PathLike | None = None) -> Path:
    """The path of data file `rel` (e.g. "mbpp/mbpp.jsonl"); a one-line error if missing.

    An explicit `data` may be the folder holding `rel` or the file itself."""
    if data is not None and Path(data).is_file():
        return Path(data)
    tried = []
    for root in data_roots(data):
        p = root / rel
        if p.is_file():
            return p
        tried.append(str(p))
    raise QProbeError(
        f"{task}: data file not found (tried {', '.join(tried)}); pass --data DIR, set "
        f"{ENV_VAR}, or run `qprobe tasks download {task}` (needs internet)"
    )


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a .jsonl or .jsonl.gz file; a one-line error naming the bad line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise QProbeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise QProbeError(f"{path}:{n}: expected a JSON object per line")
                    rows.append(row)
    except OSError as e:
        raise QProbeError(f"{path}: cannot read ({e.strerror or e})") from None
    return rows
