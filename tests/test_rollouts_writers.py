"""Several writer processes on one rollouts folder: no lost key, no duplicate, after SIGKILL too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from qprobe.rollouts import Rollouts

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from qprobe.features import FeatureSpec
    from qprobe.rollouts import RolloutWriter

    path, order, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    spec = FeatureSpec(model="tiny", layer=1, position="last", dim=4)
    w = RolloutWriter(path, meta={"task": "t", "k": 2}, feature_spec=spec)
    ids = [f"p{i:02d}" for i in range(40)]
    if order == "reverse":
        ids = ids[::-1]
    for p in ids:
        if (p, 0) in w.done and (p, 1) in w.done:
            continue
        rows = [{"prompt_id": p, "sample_idx": j, "prompt": p, "completion": f"{p}/{j}",
                 "reward": float(j)} for j in range(2)]
        feats = np.full((2, 4), int(p[1:]), dtype=np.float32)  # features say which prompt
        w.append(rows, feats, skip_stored=True)
        print(p, flush=True)
        time.sleep(pause)
    """
)


def _start(path, order, pause):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), order, str(pause)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_two_writers_one_killed_then_resume(tmp_path):
    path = tmp_path / "r"
    a = _start(path, "forward", 0.05)
    assert a.stdout.readline().strip() == "p00"  # the folder exists before the second writer
    b = _start(path, "reverse", 0.05)
    for _ in range(5):  # let both write a few shards, then kill b mid-run
        b.stdout.readline()
    b.send_signal(signal.SIGKILL)
    b.wait(timeout=30)
    assert a.wait(timeout=120) == 0
    # A kill -9 at any moment: simulate the worst leftover too (features without samples).
    np.save(path / "features-99999.npy", np.zeros((2, 4), np.float16))
    c = _start(path, "reverse", 0.0)  # the resume
    assert c.wait(timeout=120) == 0
    r = Rollouts(path)
    keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
    assert len(keys) == len(set(keys)) == 80
    assert set(keys) == {(f"p{i:02d}", j) for i in range(40) for j in range(2)}
    # Each row's features belong to its own prompt: no shard mixed two writers' files.
    np.testing.assert_array_equal(r.features[:, 0], [int(p[1:]) for p in r.prompt_ids])
    assert not (path / "features-99999.npy").exists()
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*.tmp"))


def test_concurrent_writers_never_store_a_key_twice(tmp_path):
    path = tmp_path / "r"
    first = _start(path, "forward", 0.0)
    first.stdout.readline()
    procs = [first] + [_start(path, order, 0.0) for order in ("forward", "reverse", "forward")]
    deadline = time.time() + 120
    for p in procs:
        assert p.wait(timeout=max(1, deadline - time.time())) == 0
    r = Rollouts(path)
    keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
    assert len(keys) == len(set(keys)) == 80
