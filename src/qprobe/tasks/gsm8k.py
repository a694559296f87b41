"""GSM8K (Cobbe et al., 2021): grade-school maths word problems, answer after '####'.

Extraction, as lm-evaluation-harness does it: strict = the number after '#### ' in the
completion; flexible = the last number anywhere in it. Numbers are normalised (commas, '$',
trailing '.', '12.0' == '12') before comparison with the gold answer. Prompts are
'Question: ...\\nAnswer:', optionally preceded by the first `few_shot` train examples (with their
worked solutions ending in '#### N').
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from qprobe.errors import QProbeError
from qprobe.tasks.base import Score, Task, check_columns, find_data, read_jsonl

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize(num: str) -> str | None:
    """'$1,234.50.' -> '1234.5'; None if it is not a number."""
    s = num.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    if d == d.to_integral():
        try:
            d = d.quantize(Decimal(1))
        except InvalidOperation:  # more digits than the context holds (1e30): keep it as is
            pass
    return format(d, "f")


def extract(text: str, mode: str = "flexible") -> str | None:
    """The model's final answer as a normalised number string, or None if there is none."""
    if mode == "strict":
        m = STRICT.search(text)
        return normalize(m.group(1)) if m else None
    for a, b in reversed(FLEXIBLE.findall(text)):
        n = normalize(a or b)
        if n is not None:
            return n
    return None


def gold(answer: str) -> str:
    """The gold number of a GSM8K answer field ('... #### 72')."""
    n = extract(answer, "strict")
    if n is None:
        raise QProbeError(f"gsm8k: gold answer without '#### N': {answer[-80:]!r}")
    return n


def read_split(split: str, data: str | None = None) -> list[dict]:
    """The rows {question, answer, ...} of a GSM8K split from the local data folder, checked."""
    path = find_data("gsm8k", f"gsm8k/{split}.jsonl", data)
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if "question" not in r or "answer" not in r:
            raise QProbeError(f"{path}:{n}: expected fields question and answer")
    return rows


class AnswerTask(Task):
    """A task scored by comparing the answer extracted from the completion with a gold answer.

    Rows carry an "answer" column (or the task looks it up by prompt_id). Numbers are compared
    after normalisation; `match` is the one place that decides, subclasses may refine it.
    """

    mode = "flexible"

    def match(self, completion: str, answer: str) -> tuple[bool, str | None, str | None]:
        """(correct, extracted answer, normalised gold answer)."""
        got, want = extract(completion, self.mode), normalize(str(answer))
        return got is not None and got == want, got, want

    def score(self, prompts: list[str], completions: list[str], **columns) -> list[Score]:
        check_columns(self.name, prompts, completions, columns)
        answers = columns.get("answer")
        if answers is None:
            answers = [self.row(str(pid))["answer"] for pid in columns.get("prompt_id") or []]
            if len(answers) != len(prompts):
                raise QProbeError(f"{self.name}: scoring needs prompt_id or answer columns")
        out = []
        for c, a in zip(completions, answers):
            ok, got, want = self.match(c, a)
            out.append(Score(float(ok), "passed" if ok else "failed", f"answer {got!r} vs gold {want!r}"))
        return out


class GSM8K(AnswerTask):
    description = "GSM8K: 7473 train / 1319 test maths word problems, exact numeric answer"
    stop = ["\n\nQuestion:", "Question:", "\n\n\n"]

    def __init__(self, data: str | None = None, mode: str = "flexible", few_shot: int = 0):
        if mode not in ("strict", "flexible"):
            raise QProbeError(f"gsm8k: extraction must be strict or flexible, not {mode!r}")
        self.mode, self.few_shot, self.data = mode, few_shot, data
        self.name = "gsm8k" if mode == "flexible" else "gsm8k-strict"
        self._cache: dict[str, list[dict]] = {}

    def _raw(self, split: str) -> list[dict]:
        if split not in self._cache:
            self._cache[split] = read_split(split, self.data)
        return self._cache[split]

    def splits(self) -> dict[str, int]:
        return {s: len(self._raw(s)) for s in ("train", "test")}

    def _prefix(self) -> str:
        shots = self._raw("train")[: self.few_shot]
        return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)

    def _load(self, split: str) -> list[dict]:
        prefix = self._prefix()
        return [
            {
                "id": f"{split}/{i}",
                "prompt": f"{prefix}Question: {r['question']}\nAnswer:",
                "answer": gold(r["answer"]),
            }
            for i, r in enumerate(self._raw(split))
        ]

