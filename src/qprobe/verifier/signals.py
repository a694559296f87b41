"""The stages that fill a rollouts folder's execution columns (`qprobe signals`,
docs/verifier-execution.md).

- `fill_exec`: per candidate, the error class of the test its prompt shows (`visible_status`,
  from the task's `visible_program`) and its execution signature on that test's inputs
  (`exec_sig`);
- `gentests.sample_tests` (model work, in gentests.py) writes model-written asserts beside the
  rollouts;
- `fill_gen_exec`: per candidate, which of those asserts it passes (`gen_passed`, `gen_tests`)
  and its signature on their inputs (`gen_sig`);
- `fill_fuzz`: per candidate, its signature on calls next to the shown ones (`fuzz_sig`,
  fuzz.py): MBR-exec that can still split the candidates that pass the shown test;
- `fill_answers`: for a task whose program returns an answer (gsm8k-pal), `exec_sig` is the
  answer: MBR-exec over it is the majority vote (self-consistency).

Every stage works in chunks of prompts and writes its columns after each chunk (under the
folder's lock, through `Rollouts.set_rewards`, which replaces shards atomically), so a stopped
run keeps what it finished; a resumed one computes only rows whose column is still null. A
sandbox failure leaves the row null (tried again next time). Seconds, programs and model tokens
per stage accumulate in `signals.json` beside the shards.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError
from qprobe.verifier.calls import calls_of, shown_inputs
from qprobe.verifier.programs import error_class, exec_program, passed_checks, signature
from qprobe.verifier.store import COST_FILE, add_cost, write_columns

__all__ = ["COST_FILE", "add_cost", "fill_answers", "fill_exec", "fill_fuzz", "fill_gen_exec",
           "fuzz_inputs", "write_columns"]

MAX_GEN_INPUTS = 20  # call inputs taken from a prompt's model-written tests for `gen_sig`


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _todo(r: Any, columns: tuple[str, ...], limit: int | None) -> dict[str, list[int]]:
    """Prompt id -> row indices, for prompts (the first `limit` in folder order) with a row
    whose columns are not all filled."""
    ids = r.prompt_ids.tolist()
    have = {c: r.column(c) if c in r.table.column_names else [None] * len(ids) for c in columns}
    order: list[str] = list(dict.fromkeys(ids))[:limit]
    keep = set(order)
    out: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        if pid in keep and any(have[c][i] is None for c in columns):
            out.setdefault(pid, []).append(i)
    return {pid: out[pid] for pid in order if pid in out}


def candidate_code(row: dict, completion: str) -> str:
    """What a candidate is before any test: prompt + completion + the task's setup code."""
    return row["prompt"] + completion + "\n" + (row.get("test_setup_code") or "") + "\n"


def _run_chunks(path: Path, task: Any, todo: dict[str, list[int]], chunk: int, stage: str,
                programs_of: Callable[[dict, list[int]], list[tuple[int, list[str]]]],
                columns_of: Callable[[int, list[Any]], dict[str, Any]],
                say: Callable[[str], None]) -> dict[str, int]:
    """Run the programs of `todo`'s prompts chunk by chunk and write each chunk's columns.

    programs_of(row, row indices) -> [(row index, [program, ...])]; columns_of(row index,
    verdicts) -> {column: value} (a value None is left unwritten)."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(path)
    keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
    pids = list(todo)
    n_prog = 0
    for start in range(0, len(pids), chunk):
        t0 = time.monotonic()
        jobs: list[tuple[int, int]] = []  # (row index, program number within the row)
        progs: list[str] = []
        for pid in pids[start:start + chunk]:
            row = task.row(pid)
            for i, ps in programs_of(row, todo[pid]):
                jobs += [(i, j) for j in range(len(ps))]
                progs += ps
        verdicts: dict[int, list[Any]] = {}
        for n, v in task.sandbox.map(progs):
            i, j = jobs[n]
            verdicts.setdefault(i, {})[j] = v
        updates: dict[str, dict[tuple[str, int], Any]] = {}
        for i, vs in verdicts.items():
            for name, value in columns_of(i, [vs[j] for j in sorted(vs)]).items():
                if value is not None:
                    updates.setdefault(name, {})[keys[i]] = value
        write_columns(path, updates)
        done = min(start + chunk, len(pids))
        secs = time.monotonic() - t0
        add_cost(path, stage, seconds=secs, prompts=len(pids[start:start + chunk]),
                 programs=len(progs))
        n_prog += len(progs)
        say(f"{stage}: {done}/{len(pids)} prompts, {len(progs)} programs in {secs:.1f} s")
    return {"prompts": len(pids), "programs": n_prog}


def fill_exec(path: str | os.PathLike, task: Any, *, limit: int | None = None, chunk: int = 20,
              per_step: float = 1.0, say: Callable[[str], None] = _say) -> dict[str, int]:
    """`visible_status` and `exec_sig` for every row that lacks either (first `limit` prompts)."""
    from qprobe.rollouts import Rollouts

    path = Path(path)
    r = Rollouts(path)
    todo = _todo(r, ("visible_status", "exec_sig"), limit)
    completions = r.column("completion")

    def programs_of(row: dict, rows: list[int]) -> list[tuple[int, list[str]]]:
        _, inputs = shown_inputs(row)
        out = []
        for i in rows:
            vis = task.visible_program(row, completions[i])
            out.append((i, [exec_program(candidate_code(row, completions[i]), inputs,
                                         per_step=per_step)] + ([vis] if vis is not None else [])))
        return out

    n_inputs = {}

    def columns_of(i: int, verdicts: list[Any]) -> dict[str, Any]:
        pid = r.prompt_ids[i]
        if pid not in n_inputs:
            n_inputs[pid] = len(shown_inputs(task.row(pid))[1])
        status = error_class(verdicts[1]) if len(verdicts) > 1 else "none"
        return {"exec_sig": signature(verdicts[0], n_inputs[pid]), "visible_status": status}

    say(f"exec: {len(todo)} prompts with rows to fill in {path}")
    return _run_chunks(path, task, todo, chunk, "exec", programs_of, columns_of, say)


def fill_gen_exec(path: str | os.PathLike, task: Any, *, limit: int | None = None,
                  chunk: int = 20, per_step: float = 1.0,
                  say: Callable[[str], None] = _say) -> dict[str, int]:
    """`gen_passed`, `gen_tests` and `gen_sig` for every row lacking them whose prompt has
    model-written tests stored (gentests.read_tests)."""
    from qprobe.rollouts import Rollouts
    from qprobe.verifier.gentests import read_tests

    path = Path(path)
    r = Rollouts(path)
    tests = read_tests(path)
    todo = {pid: rows for pid, rows in _todo(r, ("gen_passed", "gen_tests", "gen_sig"),
                                              limit).items() if pid in tests}
    completions = r.column("completion")

    def inputs_of(pid: str) -> list[str]:
        t = tests[pid]
        return [c for a in t["tests"] for c in calls_of(a, t["entry_point"])][:MAX_GEN_INPUTS]

    def programs_of(row: dict, rows: list[int]) -> list[tuple[int, list[str]]]:
        t = tests[row["id"]]
        return [(i, [exec_program(candidate_code(row, completions[i]), inputs_of(row["id"]),
                                  t["tests"], per_step=per_step)]) for i in rows]

    def columns_of(i: int, verdicts: list[Any]) -> dict[str, Any]:
        pid = r.prompt_ids[i]
        n = len(tests[pid]["tests"])
        passed = passed_checks(verdicts[0], n)
        return {"gen_passed": passed, "gen_tests": None if passed is None else n,
                "gen_sig": signature(verdicts[0], len(inputs_of(pid)))}

    if not tests:
        raise QProbeError(f"{path}: no model-written tests stored (run `qprobe signals "
                          "--gen-tests` first)")
    say(f"gen-exec: {len(todo)} prompts with tests and rows to fill in {path}")
    return _run_chunks(path, task, todo, chunk, "gen_exec", programs_of, columns_of, say)


def fuzz_inputs(row: dict) -> list[str]:
    """Calls next to the prompt's shown calls (fuzz.mutated_calls of each), at most
    MAX_GEN_INPUTS, in a fixed order: the inputs of `fuzz_sig`."""
    from qprobe.verifier.fuzz import mutated_calls

    _, shown = shown_inputs(row)
    out: list[str] = []
    for call in shown:
        out += [c for c in mutated_calls(call) if c not in out]
    return out[:MAX_GEN_INPUTS]


def fill_fuzz(path: str | os.PathLike, task: Any, *, limit: int | None = None, chunk: int = 20,
              per_step: float = 1.0, say: Callable[[str], None] = _say) -> dict[str, int]:
    """`fuzz_sig` for every row lacking it (first `limit` prompts): the execution signature on
    calls next to the shown ones; "" for a prompt that has none (no literal shown call)."""
    from qprobe.rollouts import Rollouts

    path = Path(path)
    r = Rollouts(path)
    todo = _todo(r, ("fuzz_sig",), limit)
    completions = r.column("completion")
    n_inputs: dict[str, int] = {}

    def programs_of(row: dict, rows: list[int]) -> list[tuple[int, list[str]]]:
        inputs = fuzz_inputs(row)
        n_inputs[row["id"]] = len(inputs)
        return [(i, [exec_program(candidate_code(row, completions[i]), inputs,
                                  per_step=per_step)]) for i in rows]

    def columns_of(i: int, verdicts: list[Any]) -> dict[str, Any]:
        n = n_inputs[r.prompt_ids[i]]
        return {"fuzz_sig": signature(verdicts[0], n) if n else ""}

    say(f"fuzz: {len(todo)} prompts with rows to fill in {path}")
    return _run_chunks(path, task, todo, chunk, "fuzz", programs_of, columns_of, say)


def fill_answers(path: str | os.PathLike, task: Any, *, limit: int | None = None,
                 chunk: int = 20, say: Callable[[str], None] = _say) -> dict[str, int]:
    """`exec_sig` for every row lacking it, for a task whose programs return an answer
    (`task.answer_signature`, e.g. gsm8k-pal): candidates with equal answers share a signature,
    so MBR-exec over it is the majority vote over answers and `mbr_share` is the answer's vote
    share. The programs run in the sandbox, as the task's reward runs them."""
    from qprobe.rollouts import Rollouts

    if not callable(getattr(task, "answer_signature", None)):
        raise QProbeError(f"task {task.name!r} gives no answers to vote on (answer tasks with "
                          "programs only, e.g. gsm8k-pal)")
    path = Path(path)
    r = Rollouts(path)
    todo = _todo(r, ("exec_sig",), limit)
    completions = r.column("completion")

    def programs_of(row: dict, rows: list[int]) -> list[tuple[int, list[str]]]:
        return [(i, [task.program(row, completions[i])]) for i in rows]

    def columns_of(i: int, verdicts: list[Any]) -> dict[str, Any]:
        return {"exec_sig": task.answer_signature(verdicts[0])}

    say(f"answers: {len(todo)} prompts with rows to fill in {path}")
    return _run_chunks(path, task, todo, chunk, "answers", programs_of, columns_of, say)
