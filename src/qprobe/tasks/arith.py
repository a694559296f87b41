"""Times tables: "What is 7 * 8? Answer with just the number." — the demo task.

Why this task: the demo runs on the embedded SmolLM2-135M-Instruct, which needs a task with a
real verifier that it solves sometimes but not always. Measured on this model (temperature 0.8,
top-p 0.95, 8 samples for each of 16 prompts, see docs/evaluation.md): GSM8K ~1-2% and two-digit
additions 1% are too hard, additions of numbers up to 20 give 16%, and single-digit times tables
give 35% with at least one correct sample for every prompt — a wide gap between pass@1 and
pass@k for a probe to close, and every answer checkable exactly.

Problems are all a * b with a, b in 2..12 (121 prompts, generated, no data file), split by a
fixed shuffle into train (81) and test (40), so test problems never appear in training.
The reward is 1 when the last number in the completion equals a * b (the same flexible
extraction as GSM8K), else 0.
"""

from __future__ import annotations

import random

from qprobe.tasks.gsm8k import AnswerTask

LOW, HIGH = 2, 12
N_TEST = 40
SPLIT_SEED = 0


def _problems() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs


class TimesTables(AnswerTask):
    name = "times-tables"
    description = "times tables a * b (a, b in 2..12), exact numeric answer; 81 train / 40 test"
    stop = ["\n"]

    def __init__(self) -> None:
        pairs = _problems()
        self._rows = {
            "train": [self._row(a, b) for a, b in pairs[N_TEST:]],
            "test": [self._row(a, b) for a, b in pairs[:N_TEST]],
        }

    @staticmethod
    def _row(a: int, b: int) -> dict:
        return {
            "id": f"{a}*{b}",
            "prompt": f"What is {a} * {b}? Answer with just the number.",
            "answer": str(a * b),
        }

    def splits(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._rows.items()}

    def _load(self, split: str) -> list[dict]:
        return [dict(r) for r in self._rows[split]]
