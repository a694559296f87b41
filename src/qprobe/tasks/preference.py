"""Preference pairs: the `hh-harmless` task and custom pair files, for the `bt` and `dpo` objectives.

Two row formats (JSONL or JSONL.gz; optional "id" and "split" fields):
- {"prompt", "chosen", "rejected"}: the prompt and the two answers, as they are;
- {"chosen", "rejected"}: two full transcripts (Anthropic HH-RLHF) that share the conversation
  so far. The prompt is their common prefix cut back to just after its last "\\n\\nAssistant:",
  so that the prompt ends where the two answers start (a shared first word of the answers stays
  in the answers, and the answer keeps its leading space, as a sampled answer would have it);
  chosen/rejected are the rests.

There is no scalar reward: `score` returns reward None ("unscored"); `pairs(split)` gives the
pairs and `qprobe collect` embeds both answers of each pair (docs/preferences.md).

`hh-harmless` splits the 2,312 pairs of HH-RLHF harmless-base/test into `train` and `test` by a
hash of the prompt (`hash_split`), so that pairs sharing a prompt always fall on one side; `all`
is every pair.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.tasks.base import Score, Task, check_columns, find_data, read_jsonl

ASSISTANT = "\n\nAssistant:"
TEST_PER_MILLE = 216  # hh-harmless: 509 test / 1803 train pairs


def split_pair(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen answer, rejected answer), or None if there is no shared prompt."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last assistant turn wholly inside the shared part
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def hash_split(prompt: str, test_per_mille: int = TEST_PER_MILLE) -> str:
    """"test" when the first 16 hex digits of sha256(prompt, UTF-8), as an integer, mod 1000
    are below `test_per_mille`, else "train". Fixed: it depends on the prompt text only."""
    h = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16], 16)
    return "test" if h % 1000 < test_per_mille else "train"


class Preferences(Task):
    """A JSONL(.gz) file of preference pairs (either format above). Rows with a "split" field
    go to that split, others to `split` (default "all")."""

    stop = ["\n\nHuman:"]

    def __init__(self, path: str | os.PathLike, name: str | None = None, split: str = "all"):
        self.path = Path(path)
        self.name = name or str(self.path)
        self.split = split
        self.description = f"preference pairs from {self.path.name}"
        self._rows: list[dict] | None = None

    def _all(self) -> list[dict]:
        if self._rows is None:
            rows, seen = [], set()
            for n, r in enumerate(read_jsonl(self.path), 1):
                for key in ("chosen", "rejected", *(["prompt"] if "prompt" in r else [])):
                    if not isinstance(r.get(key), str):
                        raise QProbeError(f"{self.path}:{n}: field {key!r} must be a string")
                if "prompt" in r:
                    parts = (r["prompt"], r["chosen"], r["rejected"])
                else:
                    parts = split_pair(r["chosen"], r["rejected"])
                    if parts is None:
                        continue  # no shared prompt ending in an assistant turn: not a pair
                pid = str(r.get("id", f"{Path(self.name).name.split('.')[0]}/{n - 1}"))
                if pid in seen:
                    raise QProbeError(f"{self.path}:{n}: duplicate id {pid!r}")
                seen.add(pid)
                prompt, chosen, rejected = parts
                rows.append({"id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "split": str(r.get("split", self.split))})
            if not rows:
                raise QProbeError(f"{self.path}: no preference pairs")
            self._rows = rows
        return self._rows

    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._all():
            out[r["split"]] = out.get(r["split"], 0) + 1
        return out

    def _load(self, split: str) -> list[dict]:
        return [r for r in self._all() if r["split"] == split]

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
    """Anthropic HH-RLHF harmless-base, test file (2312 pairs), split train/test by prompt hash."""

    description = "Anthropic HH-RLHF harmless-base test file: train 1803 / test 509 pairs"

    def __init__(self, data: str | None = None):
        super().__init__(
            find_data("hh-harmless", "hh-rlhf/harmless-base-test.jsonl.gz", data), "hh-harmless"
        )
        self.description = HHHarmless.description

    def _all(self) -> list[dict]:
        if self._rows is None:
            rows = super()._all()
            for r in rows:
                r["split"] = hash_split(r["prompt"])
        return self._rows

    def splits(self) -> dict[str, int]:
        return {**super().splits(), "all": len(self._all())}

    def _load(self, split: str) -> list[dict]:
        return self._all() if split == "all" else super()._load(split)
