"""Sentiment steering: continue an OpenWebText prompt; the reward is how positive the text is.

The prompt sets of DExperts (Liu et al., 2021), used by RAD (Deng & Raffel, 2023) and ARM
(Troshin et al., 2024): neutral 5,000, negative 2,500 and positive 2,500 prompts, rows
`{"prompt": {"text": ...}, "continuation": {"text": ...}, ...}` (MIT, serjtroshin/rad-q
`datasets/sentiment_prompts-10k/`). Files: `sentiment-prompts/{neutral,negative,positive}_prompts
.jsonl` under the data folder (--data, $QPROBE_DATA, ../shared/data, the cache).

Splits: `neutral`, `negative`, `positive` (whole files, in file order) and `neutral-train` /
`neutral-test` (4,000 / 1,000 neutral prompts by a fixed shuffle, seed 0), so guidance heads and
probes can be trained on prompts the evaluation never sees.

Reward: VADER's compound score of the continuation alone (in [-1, 1]; `vaderSentiment`, lexicon
inside the package, no download). A continuation counts as **positive when compound > 0.05**,
VADER's own documented threshold (>= 0.05 positive, <= -0.05 negative, neutral between); the
score's status says which. The papers continue each prompt by 20 new tokens without a chat
template (`MAX_NEW_TOKENS`; pass `--no-chat` / chat=False to an instruct model).
"""

from __future__ import annotations

import random

from qprobe.errors import QProbeError
from qprobe.tasks.base import Score, Task, check_columns, find_data, read_jsonl

FILES = {s: f"sentiment-prompts/{s}_prompts.jsonl" for s in ("neutral", "negative", "positive")}
POSITIVE = 0.05  # compound > this: a positive continuation
NEGATIVE = -0.05  # compound < this: a negative one
MAX_NEW_TOKENS = 20
N_TEST = 1000
SPLIT_SEED = 0


def vader():
    """The VADER analyzer (one per process; building it reads the lexicon)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise QProbeError("sentiment: needs the vaderSentiment package "
                              "(pip install vaderSentiment)") from None
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


_VADER = None


def compound(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1]."""
    an = vader()
    return [float(an.polarity_scores(t)["compound"]) for t in texts]


class Sentiment(Task):
    name = "sentiment"
    description = ("sentiment steering on DExperts' OpenWebText prompts (neutral 5000, negative "
                   "2500, positive 2500); reward = VADER compound of the continuation")
    stop: list[str] = []

    def __init__(self, data: str | None = None) -> None:
        self.data = data
        self._rows: dict[str, list[dict]] = {}

    def splits(self) -> dict[str, int]:
        n = {s: len(self._file(s)) for s in FILES}
        return {**n, "neutral-train": n["neutral"] - N_TEST, "neutral-test": N_TEST}

    def _file(self, which: str) -> list[dict]:
        if which not in self._rows:
            path = find_data(self.name, FILES[which], self.data)
            rows = []
            for n, r in enumerate(read_jsonl(path)):
                text = (r.get("prompt") or {}).get("text") if isinstance(r.get("prompt"), dict) else None
                if not isinstance(text, str) or not text:
                    raise QProbeError(f"{path}:{n + 1}: no prompt.text")
                rows.append({"id": f"{which}-{n:04d}", "prompt": text})
            self._rows[which] = rows
        return self._rows[which]

    def _load(self, split: str) -> list[dict]:
        if split in FILES:
            return [dict(r) for r in self._file(split)]
        rows = self._file("neutral")
        order = list(range(len(rows)))
        random.Random(SPLIT_SEED).shuffle(order)
        pick = sorted(order[:N_TEST] if split == "neutral-test" else order[N_TEST:])
        return [dict(rows[i]) for i in pick]

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        check_columns(self.name, prompts, completions, columns)
        out = []
        for c in compound(completions):
            status = "positive" if c > POSITIVE else "negative" if c < NEGATIVE else "neutral"
            out.append(Score(c, status))
        return out
