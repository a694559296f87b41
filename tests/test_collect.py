"""`qprobe collect` end to end on a tiny random model: store, rewards, resume, crash, refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qprobe.backends.base import LanguageModel, SamplingParams
from qprobe.cli import main
from qprobe.collect import CollectConfig, collect, collect_task
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec
from qprobe.rollouts import Rollouts
from tiny_lm import build_tokenizer, save_tiny

RESULTS = Path(__file__).resolve().parents[1] / "results" / "mbpp-qwen-coder" / "rollouts"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _prompts(path: Path, n: int, answer: bool = False) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": f"p{i}", "prompt": f"question {i}: {'ab' * (i % 4)}="}
            if answer:
                row["answer"] = "7"
            f.write(json.dumps(row) + "\n")
    return path


def _args(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(model), "--task", str(task), "--out", str(out), "--k", "3",
            "--max-new-tokens", "12", "--seed", "4", "--no-progress", *extra]


def _table(out: Path) -> dict:
    r = Rollouts(out)
    keys = list(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()))
    return {"keys": keys, "completion": r.column("completion"), "features": np.asarray(r.features)}


def _by_key(t: dict) -> dict:
    return {k: (c, f.tobytes()) for k, c, f in zip(t["keys"], t["completion"], t["features"])}


def test_collect_writes_rollouts_with_features(tiny, tmp_path, capsys):
    task = _prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "out"
    assert main(_args(tiny, task, out, "--batch-prompts", "2")) == 0
    assert "collect: 15 rows (15 new) for 5 prompts" in capsys.readouterr().err
    r = Rollouts(out)
    assert len(r) == 15 and r.features.shape == (15, 64) and r.features.dtype == np.float16
    assert r.feature_spec.dim == 64 and r.meta["k"] == 3 and r.meta["chat"] is False
    assert r.meta["sampling"]["seed"] == 4 and r.meta["split"] == "all"
    group, prompts = r.groups()
    assert prompts == [f"p{i}" for i in range(5)] and np.bincount(group).tolist() == [3] * 5
    assert np.isnan(r.rewards).all()  # a plain prompts file has no reward
    assert sorted(p.name for p in out.glob("samples-*.parquet")) == [
        "samples-00000.parquet", "samples-00001.parquet", "samples-00002.parquet"]
    # Features stored in the rollouts are the ones the embedder computes from the text.
    from qprobe.backends import load_embedder

    emb = load_embedder(str(tiny), chat=False)
    assert emb.feature_spec == r.feature_spec
    ref = emb.embed(r.column("prompt"), r.column("completion"))
    np.testing.assert_allclose(r.features.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def test_collect_scores_rewards(tiny, tmp_path):
    task = _prompts(tmp_path / "answers.jsonl", 3, answer=True)
    out = tmp_path / "out"
    assert main(_args(tiny, task, out)) == 0
    r = Rollouts(out)
    assert np.isfinite(r.rewards).all() and set(np.unique(r.rewards)) <= {0.0, 1.0}


def test_a_model_passed_in_sets_the_batch_size(tiny, tmp_path):
    """`qprobe run` hands collect a loaded model: its max_batch_rows decides the prompts per
    batch (and shard), so an experiment's `max_batch_rows` takes effect."""
    from qprobe.backends import load_model
    from qprobe.collect import CollectConfig, collect

    task = _prompts(tmp_path / "p.jsonl", 5)
    lm = load_model(str(tiny), chat=False, max_batch_rows=6)  # 6 rows // k=3: 2 prompts
    cfg = CollectConfig(out=str(tmp_path / "out"), task=str(task), k=3, max_new_tokens=6,
                        progress=False)
    collect(cfg, lm=lm)
    assert len(Rollouts(tmp_path / "out")) == 15
    assert len(list((tmp_path / "out").glob("samples-*.parquet"))) == 3  # 2 + 2 + 1 prompts


def test_same_command_reproduces_and_resume_extends(tiny, tmp_path):
    task = _prompts(tmp_path / "p.jsonl", 4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(tiny, task, a, "--batch-prompts", "2")) == 0
    # b: first two prompts, then resumed for all four (another batch composition).
    assert main(_args(tiny, task, b, "--limit", "2", "--batch-prompts", "1")) == 0
    assert len(Rollouts(b)) == 6
    assert main(_args(tiny, task, b, "--batch-prompts", "3")) == 0
    ta, tb = _table(a), _table(b)
    assert len(tb["keys"]) == len(set(tb["keys"])) == 12
    assert _by_key(ta) == _by_key(tb)
    # a resume with nothing left to do keeps the summary of the run that wrote the rows
    summary = json.loads((b / "meta.json").read_text())["summary"]
    assert summary["new_rows"] == 6
    assert main(_args(tiny, task, b, "--batch-prompts", "3")) == 0
    assert json.loads((b / "meta.json").read_text())["summary"] == summary


def test_mismatched_resume_is_refused(tiny, tmp_path, capsys):
    task = _prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "out"
    assert main(_args(tiny, task, out)) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    for extra in (["--k", "4"], ["--temperature", "0.5"], ["--layer", "0"], ["--seed", "5"]):
        args = _args(tiny, task, out)
        if extra[0] in args:
            i = args.index(extra[0])
            args[i : i + 2] = extra
        else:
            args += extra
        assert main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("qprobe: error:") and "cannot resume" in last
    assert sorted(p.name for p in out.iterdir()) == before


def test_kill_mid_collect_then_resume(tiny, tmp_path):
    """SIGKILL the collect process while it writes; rerun; nothing lost, nothing duplicated."""
    task = _prompts(tmp_path / "p.jsonl", 30)
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = _args(tiny, task, out, "--batch-prompts", "1", "--max-new-tokens", "24")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qprobe", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "samples-00002.parquet").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = len(list(out.glob("samples-*.parquet")))
    assert 3 <= shards < 30, "the kill did not land mid-run"
    assert len(Rollouts(out)) == 3 * shards  # the store is readable as it was left
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    t = _table(out)
    assert len(t["keys"]) == len(set(t["keys"])) == 90
    assert main(_args(tiny, task, ref, "--batch-prompts", "1", "--max-new-tokens", "24")) == 0
    assert _by_key(_table(ref)) == _by_key(t)


NEW_COLUMNS = ("num_tokens", "logprob_sum", "token_ids")


def test_rollouts_record_token_ids_and_logprobs(tiny, tmp_path):
    """New rollouts carry each sample's token ids (int32), token count and log-probability sum
    (float32) under the model, beside finish_reason."""
    task = _prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "out"
    assert main(_args(tiny, task, out, "--batch-prompts", "2")) == 0
    table = pq.read_table(out / "samples-00000.parquet")
    assert table.schema.field("token_ids").type == pa.list_(pa.int32())
    assert table.schema.field("logprob_sum").type == pa.float32()
    assert table.schema.field("num_tokens").type == pa.int64()
    r = Rollouts(out)
    tok = build_tokenizer()
    ids, n, lp = r.column("token_ids"), r.column("num_tokens"), r.column("logprob_sum")
    for c, i, k, x in zip(r.column("completion"), ids, n, lp):
        assert len(i) == k and x <= 0.0
        assert tok(c, add_special_tokens=False)["input_ids"] == i  # char tokens: exact ids
    assert min(lp) < 0.0


def test_an_older_folder_without_the_new_columns_resumes(tiny, tmp_path):
    """A folder written before token_ids/logprob_sum existed stays readable and resumable: new
    shards get the new columns, the old rows read as null, the samples are those of one run."""
    task = _prompts(tmp_path / "p.jsonl", 4)
    old, ref = tmp_path / "old", tmp_path / "ref"
    assert main(_args(tiny, task, old, "--limit", "2", "--batch-prompts", "1")) == 0
    for shard in old.glob("samples-*.parquet"):  # as the previous version wrote them
        t = pq.read_table(shard)
        pq.write_table(t.drop_columns([c for c in NEW_COLUMNS if c != "num_tokens"]), shard)
    assert "token_ids" not in Rollouts(old).table.column_names
    assert main(_args(tiny, task, old, "--batch-prompts", "1")) == 0
    r = Rollouts(old)
    assert len(r) == 12 and set(NEW_COLUMNS) <= set(r.table.column_names)
    lp = dict(zip(zip(r.column("prompt_id"), r.column("sample_idx")), r.column("logprob_sum")))
    assert all((lp[(f"p{i}", j)] is None) == (i < 2) for i in range(4) for j in range(3))
    assert main(_args(tiny, task, ref, "--batch-prompts", "2")) == 0
    assert _by_key(_table(ref)) == _by_key(_table(old))


def test_collect_task_with_a_prefix(tiny, tmp_path):
    """The few-shot loop: the prefix goes before each prompt when sampling, the rows keep the
    original prompt, the prefix is part of the meta identity; a rerun has nothing to do."""
    from qprobe.backends import load_model
    from qprobe.tasks import load_task

    lm = load_model(str(tiny), chat=False, feature_dtype="float32")
    task = load_task(str(_prompts(tmp_path / "p.jsonl", 3)))
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    prefix = "Answer in one word.\n"
    lines: list[str] = []
    s = collect_task(lm, task, "all", tmp_path / "few", k=1, params=params, prefix=prefix,
                     progress=False, say=lines.append)
    assert s["new_rows"] == 3 and len(lines) == 1 and lines[0].startswith("few: 3 new samples in")
    r = Rollouts(tmp_path / "few")
    assert r.column("prompt") == [row["prompt"] for row in task.prompts("all")]
    direct = lm.sample([prefix + row["prompt"] for row in task.prompts("all")], 1, params)
    assert r.column("completion") == [g[0].text for g in direct]
    identity = {k: v for k, v in r.meta.items() if k not in ("format", "feature_spec", "created",
                                                               "updated", "summary")}
    assert identity == {"model": lm.name, "task": task.name, "split": "all", "k": 1,
                        "sampling": params.to_dict(), "prefix": prefix}
    again = collect_task(lm, task, "all", tmp_path / "few", k=1, params=params, prefix=prefix,
                         progress=False, say=lines.append)
    assert again["new_rows"] == 0 and lines[-1] == "few: 3 prompts x 1 already collected"


def _stub(meta: dict, cls_name: str) -> LanguageModel:
    """A model with the identity of a stored folder that must not sample anything."""

    def sample(self, prompts, k, params):
        raise AssertionError(f"nothing should be sampled, got {len(prompts)} prompts")

    cls = type(cls_name, (LanguageModel,), {
        "feature_spec": FeatureSpec.from_dict(meta["feature_spec"]), "sample": sample,
        "name": meta["model"], "chat": False, "max_batch_rows": 256})
    return cls()


@pytest.mark.parametrize("folder", ["train", "mbpp-test", "humaneval", "greedy-mbpp-test",
                                    "greedy-humaneval", "fewshot-mbpp-test", "fewshot-humaneval"])
def test_committed_rollouts_resume_with_nothing_to_do(folder, tmp_path):
    """The committed MBPP/Qwen folders (written by `collect` and by the experiment's old
    few-shot loop) open with the one loop as they are: same identity, no prompt left to sample."""
    src = RESULTS / folder
    if not src.is_dir():
        pytest.skip("committed results not present")
    from qprobe.tasks import get_task

    out = tmp_path / folder
    shutil.copytree(src, out)
    meta = json.loads((out / "meta.json").read_text())
    try:
        task = get_task(meta["task"])
        task.prompts(meta["split"])
    except QProbeError as e:  # only the data set missing on this machine is a skip
        if "data file not found" not in str(e):
            raise
        pytest.skip(f"task data missing: {e}")
    n = len(set(Rollouts(out).column("prompt_id")))
    s = meta["sampling"]
    if folder.startswith("fewshot-"):
        params = SamplingParams(**s)
        summary = collect_task(_stub(meta, "HFLanguageModel"), task, meta["split"], out,
                               k=meta["k"], params=params, limit=n, prefix=meta["prefix"],
                               progress=False)
    else:
        cfg = CollectConfig(out=str(out), task=meta["task"], split=meta["split"], k=meta["k"],
                            limit=n, max_new_tokens=s["max_new_tokens"],
                            temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"],
                            progress=False)
        summary = collect(cfg, lm=_stub(meta, "HFLanguageModel"))
    task.close()
    assert summary["new_rows"] == 0 and summary["rows"] == n * meta["k"]
    assert json.loads((out / "meta.json").read_text()) == meta  # untouched


@pytest.mark.slow
def test_collect_from_openai_compatible_server(tmp_path, monkeypatch):
    """--model http://... samples on a real llama.cpp server; features from a local embedder."""
    from llama_server import LlamaServer  # llama-cpp-python: requirements-test.txt

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-collect")
    server = LlamaServer(tmp_path / "llama", api_key="sk-test-collect")
    try:
        task = _prompts(tmp_path / "p.jsonl", 2)
        out = tmp_path / "out"
        assert main(["collect", "--model", server.url, "--embedder", "default", "--task", str(task),
                     "--out", str(out), "--k", "2", "--max-new-tokens", "8", "--no-progress"]) == 0
    finally:
        server.stop()
    r = Rollouts(out)
    assert len(r) == 4 and r.features.shape == (4, 576)
    assert r.feature_spec.model == "SmolLM2-135M-Instruct.Q4_1.gguf"  # no chat template
    assert r.meta["backend"] == "OpenAIBackend"
