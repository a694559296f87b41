"""Preference pairs (Anthropic HH-RLHF format) for the `bt` and `dpo` objectives.

Each JSONL row holds two full transcripts, "chosen" and "rejected", that share the conversation
so far. The prompt is their common prefix cut back to just after its last "\\n\\nAssistant:", so
that a shared first word of the two answers stays in the answers; chosen/rejected are the rest.
There is no scalar reward: `score` returns reward None ("unscored"); use `pairs(split)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.tasks.base import Score, Task, check_columns, find_data, read_jsonl

ASSISTANT = "\n\nAssistant:"


def split_pair(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen answer, rejected answer), or None if there is no shared prompt."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last assistant turn wholly inside the shared part
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


class Preferences(Task):
    """Any JSONL(.gz) of {"chosen", "rejected"} transcripts (optional "id")."""

    stop = ["\n\nHuman:"]

    def __init__(self, path: str | os.PathLike, name: str | None = None, split: str = "test"):
        self.path = Path(path)
        self.name = name or self.path.name.split(".")[0]
        self.split = split
        self.description = f"preference pairs from {self.path.name}"
        self._rows: list[dict] | None = None

    def _all(self) -> list[dict]:
        if self._rows is None:
            rows, seen = [], set()
            for n, r in enumerate(read_jsonl(self.path), 1):
                if not isinstance(r.get("chosen"), str) or not isinstance(r.get("rejected"), str):
                    raise QProbeError(f"{self.path}:{n}: expected string fields chosen, rejected")
                parts = split_pair(r["chosen"], r["rejected"])
                if parts is None:
                    continue  # no shared prompt ending in an assistant turn: not a pair
                pid = str(r.get("id", f"{self.name}/{n - 1}"))
                if pid in seen:
                    raise QProbeError(f"{self.path}:{n}: duplicate id {pid!r}")
                seen.add(pid)
                prompt, chosen, rejected = parts
                rows.append({"id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected})
            self._rows = rows
        return self._rows

    def splits(self) -> dict[str, int]:
        return {self.split: len(self._all())}

    def _load(self, split: str) -> list[dict]:
        return self._all()

    def pairs(self, split: str, limit: int | None = None) -> list[dict]:
        """Rows {prompt_id, prompt, chosen, rejected} (answer texts) for bt / dpo."""
        return [
            {"prompt_id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": r["rejected"]}
            for r in self.prompts(split, limit)
        ]  # fmt: skip

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        check_columns(self.name, prompts, completions, columns)
        return [Score(None, "unscored", "preference data has no scalar reward")] * len(prompts)


class HHHarmless(Preferences):
    """Anthropic HH-RLHF harmless-base, test split (2312 pairs)."""

    def __init__(self, data: str | None = None):
        super().__init__(
            find_data("hh-harmless", "hh-rlhf/harmless-base-test.jsonl.gz", data), "hh-harmless"
        )
        self.description = "Anthropic HH-RLHF harmless-base test: 2312 chosen/rejected pairs"
