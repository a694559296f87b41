"""MBPP (Austin et al., 2021) as the Q-probe paper uses it.

Splits by task id: test 11-510 (500), train 511-974 (464 = validation 511-600 plus train
601-974; the paper trains on both), validation 511-600 (90) on its own, prompt 1-10 (few-shot
pool). Prompt: '\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'; the model writes the code. Reward 1 iff
every assert of test_list passes after test_setup_code. Data: the official mbpp.jsonl
(../shared/data/mbpp/mbpp.jsonl in tests; `qprobe tasks download mbpp` to fetch it).
"""

from __future__ import annotations

from qprobe.errors import QProbeError
from qprobe.sandbox import SandboxConfig
from qprobe.tasks.base import find_data, read_jsonl
from qprobe.tasks.code import CodeTask

SPLITS = {
    "train": range(511, 975),
    "test": range(11, 511),
    "validation": range(511, 601),
    "prompt": range(1, 11),
}
FEW_SHOT_IDS = [2, 3, 4, 1, 5, 6, 7, 8, 9, 10]  # 2-4 are the original paper's 3-shot prompt


def format_prompt(text: str, first_test: str) -> str:
    return f'"""\n{text}\n{first_test}\n"""\n'


class MBPP(CodeTask):
    name = "mbpp"
    description = "MBPP: 974 Python problems; train 464 / test 500 as in the Q-probe paper"
    # After the code the model tends to close with a new docstring, asserts or a demo call.
    stop = ['\n"""', "\nassert", "\nif __name__", "\nprint(", "\n#", "\n```"]

    def __init__(
        self, data: str | None = None, sandbox: SandboxConfig | None = None, few_shot: int = 0
    ):
        super().__init__(sandbox)
        self.path = find_data("mbpp", "mbpp/mbpp.jsonl", data)
        if not 0 <= few_shot <= len(FEW_SHOT_IDS):
            raise QProbeError(f"mbpp: few_shot must be 0..{len(FEW_SHOT_IDS)}, got {few_shot}")
        self.few_shot = few_shot
        self._by_id: dict[int, dict] | None = None

    def _rows(self) -> dict[int, dict]:
        if self._by_id is None:
            by_id = {}
            for n, r in enumerate(read_jsonl(self.path), 1):
                missing = {"task_id", "text", "code", "test_list"} - r.keys()
                if missing:
                    raise QProbeError(f"{self.path}:{n}: missing {', '.join(sorted(missing))}")
                by_id[int(r["task_id"])] = r
            self._by_id = by_id
        return self._by_id

    def _prefix(self) -> str:
        rows = self._rows()
        shots = [rows[i] for i in FEW_SHOT_IDS[: self.few_shot]]
        return "".join(
            format_prompt(r["text"], r["test_list"][0]) + r["code"].replace("\r\n", "\n") + "\n\n"
            for r in shots
        )

    def splits(self) -> dict[str, int]:
        rows = self._rows()
        return {k: sum(i in rows for i in ids) for k, ids in SPLITS.items()}

    def _load(self, split: str) -> list[dict]:
        rows, prefix = self._rows(), self._prefix()
        return [
            {
                "id": str(i),
                "prompt": prefix + format_prompt(rows[i]["text"], rows[i]["test_list"][0]),
                "text": rows[i]["text"],
                "test_list": list(rows[i]["test_list"]),
                "test_setup_code": rows[i].get("test_setup_code", ""),
                "code": rows[i]["code"],
            }
            for i in SPLITS[split]
            if i in rows
        ]

    def row(self, prompt_id: str) -> dict:
        rows = self._rows()
        try:
            r = rows[int(prompt_id)]
        except (KeyError, ValueError):
            raise QProbeError(f"mbpp: unknown prompt_id {prompt_id!r}") from None
        return {
            "id": str(r["task_id"]),
            "prompt": self._prefix() + format_prompt(r["text"], r["test_list"][0]),
            "test_list": list(r["test_list"]),
            "test_setup_code": r.get("test_setup_code", ""),
        }

    def row_from_prompt(self, prompt: str) -> dict:
        """A prompt in MBPP's format but not in the data: its assert lines are the shown tests."""
        asserts = [ln.strip() for ln in prompt.splitlines() if ln.strip().startswith("assert ")]
        return {"prompt": prompt, "test_list": asserts[-1:], "test_setup_code": ""}

    def visible_program(self, row: dict, completion: str) -> str | None:
        """The prompt shows test_list[0]: the completion run against that assert alone."""
        if not row["test_list"]:
            return None
        return (row["prompt"] + completion + "\n" + (row.get("test_setup_code") or "") + "\n"
                + row["test_list"][0] + "\n")

    def program(self, row: dict, completion: str) -> str:
        return (
            row["prompt"] + completion + "\n" + (row.get("test_setup_code") or "") + "\n"
            + "\n".join(row["test_list"]) + "\n"
        )  # fmt: skip
