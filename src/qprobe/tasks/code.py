"""Code tasks: the reward is whether prompt + completion + tests runs to the end in the sandbox."""

from __future__ import annotations

import atexit
from collections.abc import Callable

from qprobe.sandbox import Sandbox, SandboxConfig
from qprobe.tasks.base import Score, Task, check_columns

# Where a code completion usually ends (Codex / HumanEval convention): a new top-level
# definition, a main guard, a print or a comment at column 0.
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


class CodeTask(Task):
    """Scores by running `program(row, completion)` in the sandbox, one fresh process each."""

    def __init__(self, sandbox: SandboxConfig | None = None):
        self.sandbox_config = sandbox or SandboxConfig()
        self._sandbox: Sandbox | None = None

    def program(self, row: dict, completion: str) -> str:
        """The full program whose running to the end means the completion passes."""
        raise NotImplementedError

    def row_from_prompt(self, prompt: str) -> dict:
        """A row for a prompt outside the data set, from the prompt text alone (what
        `visible_program` needs), for `visible_reward` on a user's own prompts."""
        from qprobe.errors import QProbeError

        raise QProbeError(f"{self.name}: prompt not in the data set and no prompt_id given")

    def visible_program(self, row: dict, completion: str) -> str | None:
        """A program that runs only the tests the prompt itself shows (None: the prompt shows
        none). Passing them is a signal available at inference time, unlike the reward."""
        return None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.sandbox_config)
            atexit.register(self._sandbox.close)
        return self._sandbox

    def rows_for(self, prompts: list[str], prompt_id: list | None) -> list[dict]:
        """The data row behind each prompt: by prompt_id when given, else by prompt text."""
        if prompt_id is not None:
            return [self.row(str(pid)) for pid in prompt_id]
        by_prompt = {}
        for split in self.splits():
            for r in self._load(split):
                by_prompt.setdefault(r["prompt"], r)
        from qprobe.errors import QProbeError

        out = []
        for p in prompts:
            if p not in by_prompt:
                raise QProbeError(f"{self.name}: prompt not in the data set and no prompt_id given")
            out.append(by_prompt[p])
        return out

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        progress: Callable[[int], object] | None = None,
        **columns,
    ) -> list[Score]:
        """Run every program in the sandbox; `progress(1)` is called as each one finishes."""
        check_columns(self.name, prompts, completions, columns)
        rows = self.rows_for(prompts, columns.get("prompt_id"))
        programs = [self.program(r, c) for r, c in zip(rows, completions)]
        out: list[Score | None] = [None] * len(programs)
        for i, v in self.sandbox.map(programs):
            out[i] = Score(v.reward, v.status, v.detail)
            if progress is not None:
                progress(1)
        return out

    def visible_reward(self, prompts: list[str], completions: list[str], **columns
                       ) -> list[float | None]:
        """1.0 / 0.0: whether each completion passes the tests shown in its prompt, run in the
        sandbox; None where the prompt shows no test."""
        from qprobe.errors import QProbeError

        check_columns(self.name, prompts, completions, columns)
        try:
            rows = self.rows_for(prompts, columns.get("prompt_id"))
        except QProbeError:
            if columns.get("prompt_id") is not None:
                raise
            rows = [self.row_from_prompt(p) for p in prompts]  # a user's own prompts
        programs = [self.visible_program(r, c) for r, c in zip(rows, completions)]
        todo = [i for i, p in enumerate(programs) if p is not None]
        out: list[float | None] = [None] * len(programs)
        for j, v in self.sandbox.map([programs[i] for i in todo]):
            out[todo[j]] = 1.0 if v.reward == 1.0 else 0.0
        return out

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
