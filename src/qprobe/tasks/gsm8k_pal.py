"""GSM8K, program-aided (PAL, Gao et al. 2022; the bigcode harness's pal-gsm8k): the model writes
the body of a Python function `solution()` whose return value is the answer.

Prompt (docs/gsm8k-pal.md): `few_shot` worked examples, then the question, each as

    Q: {question}

    # solution in Python:


    def solution():
        \"\"\"{question}\"\"\"

and for a shot the body follows, ending in `return result`, then four blank lines. The prompt
ends after the docstring line, so the model writes only the body (PAL's own prompt has the model
repeat the signature and the question; putting them in the prompt saves those tokens on every
sample). The shots are the first `few_shot` questions of GSM8K's train split with programs written
by hand (`SHOTS`, each checked against its gold answer by the tests); those questions are left
out of the train split's prompts, and no test question is ever a shot.

Scoring runs the program (the prompt's `def solution():` with its docstring, the completion, and
a trusted suffix that calls `solution()` and prints its value) in the sandbox, one fresh process
each; the printed value is parsed here as text. A program that times out, raises, returns
something that is not a finite number, or prints no value scores 0. The answer is the returned
number rounded to 6 decimals (so 0.1 + 0.2 == 0.3 and 17.9999999 == 18), normalised as GSM8K's
(qprobe.tasks.gsm8k.normalize), and correct iff it equals the gold answer.

`answer_signature` turns a verdict into the candidate's execution signature (the `exec_sig`
column, qprobe.verifier.agreement): candidates with equal answers share it, so MBR-exec over it is
the majority vote over answers (self-consistency, Wang et al. 2022) and `mbr_share` is the vote
share of a candidate's answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig, Verdict
from qprobe.tasks.base import Score, check_columns
from qprobe.tasks.code import CodeTask
from qprobe.tasks.gsm8k import gold, normalize, read_split

MARK = "@@qprobe-pal@@"
DECIMALS = 6  # a returned float is rounded to this many decimals before comparison and voting

# The trusted text after the model's program: call solution() once, print its value as a float.
SUFFIX = '''

import json as _qp_json
_qp_value = solution()
if isinstance(_qp_value, (bool, complex)):
    raise TypeError("solution() returned " + type(_qp_value).__name__)
print("\\n" + {mark!r} + _qp_json.dumps(repr(float(_qp_value))))
'''

# (train index, program body) of the shots: the first questions of GSM8K train, solved by hand.
SHOTS: list[tuple[int, str]] = [
    (0, """\
    clips_april = 48
    clips_may = clips_april / 2
    result = clips_april + clips_may
    return result
"""),
    (1, """\
    hourly_rate = 12
    minutes_worked = 50
    result = hourly_rate * minutes_worked / 60
    return result
"""),
    (2, """\
    wallet_cost = 100
    betty_has = wallet_cost / 2
    from_parents = 15
    from_grandparents = 2 * from_parents
    result = wallet_cost - betty_has - from_parents - from_grandparents
    return result
"""),
    (3, """\
    total_pages = 120
    read_yesterday = 12
    read_today = 2 * read_yesterday
    remaining = total_pages - read_yesterday - read_today
    result = remaining / 2
    return result
"""),
    (4, """\
    pages_per_letter = 3
    friends = 2
    times_per_week = 2
    weeks_per_year = 52
    result = pages_per_letter * friends * times_per_week * weeks_per_year
    return result
"""),
    (5, """\
    yellow = 10
    purple = yellow * (1 + 0.80)
    green = 0.25 * (yellow + purple)
    result = yellow + purple + green
    return result
"""),
    (6, """\
    large_pizzas = 2
    small_pizzas = 2
    slices_large = 16
    slices_small = 8
    result = large_pizzas * slices_large + small_pizzas * slices_small
    return result
"""),
    (7, """\
    weight = 2
    weight = weight * 3
    weight = weight + 2
    weight = weight * 2
    result = weight
    return result
"""),
]


def header(question: str) -> str:
    """The function header the prompt ends with: `def solution():` and the question as its
    docstring (backslashes and triple quotes escaped)."""
    doc = question.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'def solution():\n    """{doc}"""\n'


def format_question(question: str) -> str:
    """One question in the prompt's format, up to where the body starts."""
    return f"Q: {question.strip()}\n\n# solution in Python:\n\n\n{header(question)}"


def answer_of(v: Verdict) -> str | None:
    """The normalised number a program printed after MARK, if it ran to the end; else None."""
    try:
        x = float(v.marked(MARK))
    except (ValueError, TypeError):  # no marked line (None), or not a number
        return None
    return normalize(repr(round(x, DECIMALS))) if math.isfinite(x) else None


def answer_signature(v: Verdict) -> str | None:
    """The candidate's execution signature (`exec_sig`): '["=<answer>"]' when it returned a
    number, else '!' + why ('!timeout', '!error', '!failed', '!no_answer': it agrees with
    nobody, qprobe.verifier.agreement.failed); None when the sandbox itself failed (computed
    again on resume)."""
    if v.status == "sandbox_error":
        return None
    got = answer_of(v)
    if got is not None:
        return json.dumps([f"={got}"], separators=(",", ":"))
    return "!" + ("no_answer" if v.status == "passed" else v.status)


class GSM8KPAL(CodeTask):
    """GSM8K with program-aided answers, scored in the sandbox."""

    name = "gsm8k-pal"  # "gsm8k-pal-Nshot" when few_shot is not 8
    description = ("GSM8K program-aided (PAL): the model writes solution(); its return value, "
                   "run in the sandbox, is the answer")
    # After the body: blank lines and the next question (PAL's own stop is three newlines).
    stop = ["\n\n\n", "\nQ:", "\n# solution", "\nif __name__", "\nprint("]

    def __init__(self, data: str | None = None, sandbox: SandboxConfig | None = None,
                 few_shot: int = 8):
        super().__init__(sandbox or SandboxConfig(timeout=5.0))
        if not 0 <= few_shot <= len(SHOTS):
            raise QProbeError(f"gsm8k-pal: few_shot must be 0..{len(SHOTS)}, got {few_shot}")
        self.data, self.few_shot = data, few_shot
        self.name = "gsm8k-pal" if few_shot == len(SHOTS) else f"gsm8k-pal-{few_shot}shot"
        self._cache: dict[str, list[dict]] = {}

    def _raw(self, split: str) -> list[dict]:
        if split not in self._cache:
            self._cache[split] = read_split(split, self.data)
        return self._cache[split]

    def shot_ids(self) -> set[int]:
        """Train indices of the shots every split leaves out (all of SHOTS, whatever few_shot:
        the train prompts do not change with the number of shots)."""
        return {i for i, _ in SHOTS}

    def splits(self) -> dict[str, int]:
        return {"train": len(self._raw("train")) - len(self.shot_ids()),
                "test": len(self._raw("test"))}

    def prefix(self) -> str:
        """The few-shot examples put before every question."""
        train = self._raw("train")
        return "".join(format_question(train[i]["question"]) + body + "\n\n\n\n\n"
                       for i, body in SHOTS[: self.few_shot])

    def _load(self, split: str) -> list[dict]:
        prefix, skip = self.prefix(), self.shot_ids() if split == "train" else set()
        return [{"id": f"{split}/{i}", "prompt": prefix + format_question(r["question"]),
                 "question": r["question"], "answer": gold(r["answer"])}
                for i, r in enumerate(self._raw(split)) if i not in skip]

    def row(self, prompt_id: str) -> dict:
        split, _, num = str(prompt_id).partition("/")
        if split not in ("train", "test") or not num.isdigit() or int(num) >= len(self._raw(split)):
            raise QProbeError(f"gsm8k-pal: unknown prompt_id {prompt_id!r}")
        r = self._raw(split)[int(num)]
        return {"id": f"{split}/{num}", "prompt": self.prefix() + format_question(r["question"]),
                "question": r["question"], "answer": gold(r["answer"])}

    def program(self, row: dict, completion: str) -> str:
        """header + completion + the trusted suffix that prints solution()'s value."""
        return header(row["question"]) + completion + "\n" + SUFFIX.format(mark=MARK)

    def answer_signature(self, v: Verdict) -> str | None:
        """`answer_signature(v)`: what `qprobe.verifier.signals.fill_answers` stores."""
        return answer_signature(v)

    def verdicts(self, rows: list[dict], completions: list[str],
                 progress: Callable[[int], object] | None = None) -> list[Verdict]:
        """Each completion's program run in the sandbox, in order."""
        out: list[Verdict | None] = [None] * len(completions)
        for i, v in self.sandbox.map([self.program(r, c) for r, c in zip(rows, completions)]):
            out[i] = v
            if progress is not None:
                progress(1)
        return out  # type: ignore[return-value]

    def score(self, prompts: list[str], completions: list[str],
              progress: Callable[[int], object] | None = None, **columns) -> list[Score]:
        """1.0 iff the program returns the gold number; timeouts and errors score 0."""
        check_columns(self.name, prompts, completions, columns)
        rows = self.rows_for(prompts, columns.get("prompt_id"))
        out = []
        for r, v in zip(rows, self.verdicts(rows, completions, progress)):
            if v.status == "sandbox_error":
                out.append(Score(None, v.status, v.detail))
                continue
            got, want = answer_of(v), normalize(str(r["answer"]))
            ok = got is not None and got == want
            status = "passed" if ok else ("failed" if v.status == "passed" else v.status)
            out.append(Score(float(ok), status, f"answer {got!r} vs gold {want!r}"
                             + ("" if v.status == "passed" else f" ({v.detail[:120]})")))
        return out
