"""`qprobe collect --executor ray` on a real local Ray cluster (2 CPUs) with a tiny random model:
the same rows as the local collector (sampled prompts, and preference pairs), actors killed mid-run, a batch that keeps killing actors,
the driver killed and rerun, and a second node joined with `ray start --address` on loopback.

Every test is bounded: subprocesses have timeouts and a hung test ends the run after
HANG_SECONDS (faulthandler) instead of hanging CI.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from qprobe.collect import CollectConfig, RayConfig, collect  # noqa: E402
from qprobe.errors import QProbeError  # noqa: E402
from qprobe.rollouts import Rollouts  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

HANG_SECONDS = 600
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Keep Ray light on a shared 2-core machine: no dashboard, no usage report, a small object store.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
           "RAY_enable_metrics_collection": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _bounded():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPUs, this process its first driver; yields its address."""
    os.environ.update(RAY_ENV)
    torch.set_num_threads(1)
    for attempt in range(3):  # Ray gives its raylet 30 s to register; a crowded machine may not
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False,
                     object_store_memory=80 * 2**20, log_to_driver=False, logging_level="warning")
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _prompts(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"question {i}: {'ab' * (i % 4)}="}) + "\n")
    return path


def _cfg(tiny: Path, task: Path | str, out: Path, **kw) -> CollectConfig:
    """The test's collection; Ray knobs (workers, retries, storage, ...) go to its RayConfig."""
    base = dict(model=str(tiny), task=str(task), out=str(out), k=3, max_new_tokens=12, seed=4,
                batch_prompts=1, progress=False, workers=2)
    kw = {**base, **kw}
    knobs = {f.name for f in fields(RayConfig)}
    ray_kw = {n: kw.pop(n) for n in list(kw) if n in knobs}
    return CollectConfig(**kw, ray=RayConfig(**ray_kw))


def _by_key(out: Path) -> dict:
    r = Rollouts(out)
    keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
    assert len(keys) == len(set(keys)), "a key is stored twice"
    return {k: (c, f.tobytes()) for k, c, f in zip(keys, r.column("completion"),
                                                  np.asarray(r.features))}


def _identity(out: Path) -> dict:
    meta = Rollouts(out).meta
    return {k: v for k, v in meta.items() if k not in ("summary", "created", "updated")}


def test_ray_collect_equals_local_row_for_row(cluster, tiny, tmp_path):
    task = _prompts(tmp_path / "p.jsonl", 8)
    local = collect(_cfg(tiny, task, tmp_path / "local", batch_prompts=2))
    lines: list[str] = []
    s = collect(_cfg(tiny, task, tmp_path / "ray", batch_prompts=2, executor="ray"),
                say=lines.append)
    assert s["new_rows"] == local["new_rows"] == 24
    assert s["executor"]["committed_by_actors"] == 24 and s["executor"]["deaths"] == 0
    # every actor that attached says so; the second may attach after the first has done all
    # four batches (start-up timing on a loaded machine), so at least one, never the driver mode
    assert sum("commits its shards to the shared rollouts folder" in ln for ln in lines) >= 1
    assert not any("returns its rows to the driver" in ln for ln in lines)
    assert _by_key(tmp_path / "ray") == _by_key(tmp_path / "local")
    assert _identity(tmp_path / "ray") == _identity(tmp_path / "local")


def test_ray_collects_preference_pairs_as_the_local_executor(cluster, tiny, tmp_path):
    """hh-harmless pairs through Ray actors (both answers embedded, 2 samples of the prompt beside
    each pair): the rows (texts, roles, log-likelihoods, token ids, features), pairs.parquet and
    the folder's identity equal the local executor's."""
    kw = dict(split="test", data=str(DATA), limit=5, k=2, max_new_tokens=6, batch_prompts=2)
    local = collect(_cfg(tiny, "hh-harmless", tmp_path / "local", **kw))
    lines: list[str] = []
    s = collect(_cfg(tiny, "hh-harmless", tmp_path / "ray", executor="ray", **kw),
                say=lines.append)
    assert s["pairs"] == local["pairs"] == 5 and s["new_rows"] == local["new_rows"] == 5 * 4
    assert s["executor"]["batches"] == 3 and s["executor"]["deaths"] == 0
    assert s["executor"]["committed_by_actors"] == 20
    a, b = Rollouts(tmp_path / "ray"), Rollouts(tmp_path / "local")
    assert a.meta["kind"] == "preferences" and _identity(tmp_path / "ray") == _identity(tmp_path / "local")
    assert a.pairs.equals(b.pairs) and a.pairs.num_rows == 5
    assert _by_key(tmp_path / "ray") == _by_key(tmp_path / "local")
    for col in ("role", "logprob_sum", "token_ids", "prompt"):
        assert dict(zip(zip(a.prompt_ids, a.sample_idx), a.column(col))) == dict(
            zip(zip(b.prompt_ids, b.sample_idx), b.column(col))), col
    assert sorted(a.column("role")).count("sample") == 10
    # a rerun finds every pair stored and leaves pairs.parquet as it was
    again = collect(_cfg(tiny, "hh-harmless", tmp_path / "ray", executor="ray", **kw))
    assert again["new_rows"] == 0 and Rollouts(tmp_path / "ray").pairs.equals(b.pairs)


POISON = '''
import os, signal
from qprobe.tasks.base import Task

class Poison(Task):
    """Six prompts; scoring prompt p3 kills the process (an actor that always dies on it)."""
    name = "poison"
    def splits(self):
        return {"all": 6}
    def _load(self, split):
        return [{"id": f"p{i}", "prompt": f"question {i}="} for i in range(6)]
    def reward(self, prompts, completions, **columns):
        if "question 3=" in prompts:
            os.kill(os.getpid(), signal.SIGKILL)
        return [1.0] * len(prompts)
'''


def test_a_batch_that_keeps_killing_actors_is_reported_not_retried_forever(cluster, tiny, tmp_path):
    """Also the mode without shared storage: the actors return their rows to the driver."""
    (tmp_path / "poison.py").write_text(POISON)
    out = tmp_path / "ray"
    lines: list[str] = []
    cfg = _cfg(tiny, f"{tmp_path / 'poison.py'}:Poison", out, executor="ray", retries=1,
               storage="driver")
    with pytest.raises(QProbeError, match=r"1 of 6 batches kept killing actors.*batch 3 \(prompts p3\)"):
        collect(cfg, say=lines.append)
    assert sum("returns its rows to the driver" in ln for ln in lines) >= 2
    assert sum("died in batch 3" in ln for ln in lines) == 2  # tried twice, then reported
    stored = Rollouts(out)
    assert sorted(set(stored.prompt_ids.tolist())) == ["p0", "p1", "p2", "p4", "p5"]
    assert len(stored) == 15 and (stored.rewards == 1.0).all()
    # The same prompts collected here, without p3: the same rows (seeds follow the prompt text).
    with open(tmp_path / "same.jsonl", "w") as f:
        for i in (0, 1, 2, 4, 5):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"question {i}="}) + "\n")
    collect(_cfg(tiny, tmp_path / "same.jsonl", tmp_path / "local"))
    assert _by_key(out) == _by_key(tmp_path / "local")


def _cli(tiny: Path, task: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "qprobe", "collect", "--model", str(tiny), "--task", str(task),
            "--out", str(out), "--k", "3", "--max-new-tokens", "24", "--seed", "4",
            "--batch-prompts", "1", "--no-progress", "--executor", "ray", "--address", address,
            "--workers", "2"]


def test_driver_killed_then_rerun_resumes(cluster, tiny, tmp_path):
    task = _prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "ray"
    env = dict(os.environ, **RAY_ENV)
    proc = subprocess.Popen(_cli(tiny, task, out, cluster), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while time.time() < deadline and not (out / "samples-00001.parquet").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = len(list(out.glob("samples-*.parquet")))
    assert 2 <= shards < 12, "the kill did not land mid-run"
    # The rerun (here) needs the cluster's 2 CPUs: it ends only if Ray ended the dead driver's actors.
    summary = collect(_cfg(tiny, task, out, executor="ray", max_new_tokens=24))
    assert 0 < summary["new_rows"] <= 36 - 3 * shards
    collect(_cfg(tiny, task, tmp_path / "local", max_new_tokens=24))
    assert _by_key(out) == _by_key(tmp_path / "local")  # 36 rows


ONCE = '''
import os, signal
from pathlib import Path
from qprobe.tasks.base import Task

MARK = Path({mark!r})

class Once(Task):
    """Six prompts; the first process to score p3 dies of SIGKILL (leaving MARK), later ones
    score it: one actor death mid-run, wherever the actor runs, however fast the machine."""
    name = "once"
    def splits(self):
        return {{"all": 6}}
    def _load(self, split):
        return [{{"id": f"p{{i}}", "prompt": f"question {{i}}="}} for i in range(6)]
    def reward(self, prompts, completions, **columns):
        if any("question 3=" in p for p in prompts) and not MARK.exists():
            MARK.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return [1.0] * len(prompts)
'''


def test_a_second_node_on_loopback_and_an_actor_killed_there(cluster, tiny, tmp_path):
    """`ray start --address` adds a 1-CPU node; the first node's 2 CPUs are held by another
    actor, so the collection's actor runs on the new node; it is SIGKILLed mid-run (by its own
    reward, once): its batch is re-queued to a new actor, nothing is lost or stored twice, and
    the rows are the local collector's."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = dict(os.environ, **RAY_ENV)
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    node = subprocess.Popen([str(ray_bin), "start", "--address", cluster, "--num-cpus", "1",
                             "--object-store-memory", str(80 * 2**20), "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    @ray.remote(num_cpus=2)
    class Hold:  # takes the first node's CPUs (the new node has only one)
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    hold = None
    try:
        deadline = time.time() + 120
        new: set[str] = set()
        while time.time() < deadline and not new:
            assert node.poll() is None, "ray start --address exited"
            new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
            time.sleep(0.5)
        assert new, "the second node did not join"
        second = next(iter(new))
        hold = Hold.remote()
        assert ray.get(hold.node.remote(), timeout=120) != second
        mark = tmp_path / "died"
        (tmp_path / "once.py").write_text(ONCE.format(mark=str(mark)))
        task = f"{tmp_path / 'once.py'}:Once"
        out = tmp_path / "ray"
        lines: list[str] = []
        s = collect(_cfg(tiny, task, out, executor="ray", workers=1, max_new_tokens=24),
                    say=lines.append)
        assert mark.exists(), lines
        assert any(f"node {second[:8]}" in ln and "commits its shards" in ln for ln in lines), lines
        assert s["executor"]["deaths"] == 1 and not s["executor"]["failed_batches"]
        assert any("died in batch" in ln and "re-queued" in ln for ln in lines), lines
        collect(_cfg(tiny, task, tmp_path / "local", max_new_tokens=24))  # MARK exists: no kill
        assert _by_key(out) == _by_key(tmp_path / "local")  # 18 rows, none lost, none twice
    finally:
        if hold is not None:
            ray.kill(hold)
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        # `ray start` records the cluster as this machine's current one; a later `ray.init()`
        # would try to join it once it is gone.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip() == cluster:
            current.unlink()
