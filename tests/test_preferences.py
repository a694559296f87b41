"""Preference pairs end to end on a tiny model: the hh-harmless splits, pair files, `collect`
writing both answers' features and pairs.parquet (resumable), `train --objective bt|dpo` and
`evaluate` reporting pair accuracy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qprobe.cli import main
from qprobe.errors import QProbeError
from qprobe.rollouts import Rollouts
from qprobe.tasks import get_task
from qprobe.tasks.preference import hash_split
from tiny_lm import save_tiny

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_hh_harmless_splits_by_prompt_hash():
    t = get_task("hh-harmless", data=str(DATA))
    train, test = t.pairs("train"), t.pairs("test")
    assert (len(train), len(test)) == (1803, 509)
    assert all(hash_split(p["prompt"]) == "test" for p in test)
    assert all(hash_split(p["prompt"]) == "train" for p in train)
    # pairs that share a prompt never straddle the split
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    with gzip.open(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        raw = {f"hh-harmless/{i}": json.loads(x) for i, x in enumerate(f)}
    for p in test[:50]:  # the prompt ends where both answers start, at an assistant turn
        assert p["prompt"].endswith("\n\nAssistant:") and p["chosen"] != p["rejected"]
        r = raw[p["prompt_id"]]
        assert (p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) == (r["chosen"], r["rejected"])


def _pair_file(path: Path, n: int, start: int = 0, split: str | None = None) -> Path:
    """Pairs whose chosen answer ends in '!' and rejected one in '?': a planted preference."""
    with open(path, "w") as f:
        for i in range(start, start + n):
            row = {"id": f"q{i}", "prompt": f"Human: tell me {i % 7} things {'ab' * (i % 3)}\nA:",
                   "chosen": f" sure {i % 5} ok!", "rejected": f" hmm {i % 4} no?"}
            f.write(json.dumps({**row, **({"split": split} if split else {})}) + "\n")
    return path


def test_pair_file_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "P:", "chosen": " a", "rejected": " b", "split": "dev"}) + "\n"
                 + json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: yes", "rejected":
                               "\n\nHuman: x\n\nAssistant: no"}) + "\n")
    t = get_task(str(f))
    assert t.splits() == {"dev": 1, "all": 1}
    assert t.pairs("all") == [{"prompt_id": "p/1", "prompt": "\n\nHuman: x\n\nAssistant:",
                               "chosen": " yes", "rejected": " no"}]
    f.write_text(json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(QProbeError, match="'prompt' must be a string"):
        get_task(str(f)).pairs("all")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return save_tiny(tmp_path_factory.mktemp("prefs") / "model")


def _collect(model: Path, task: Path, out: Path, *extra: str) -> int:
    return main(["collect", "--model", str(model), "--task", str(task), "--out", str(out),
                 "--layer", "1", "--no-progress", "--batch-prompts", "4", *extra])


def test_collect_pairs_features_are_the_embedders(tiny, tmp_path):
    from qprobe.backends import load_model

    task = _pair_file(tmp_path / "train.jsonl", 10)
    out = tmp_path / "roll"
    assert _collect(tiny, task, out) == 0
    r = Rollouts(out)
    assert len(r) == 20 and r.meta["kind"] == "preferences" and r.meta["k"] == 0
    pairs = r.pairs.to_pylist()
    assert pairs[0] == {"prompt_id": "q0", "chosen": 0, "rejected": 1} and len(pairs) == 10
    assert r.column("role")[:2] == ["chosen", "rejected"]
    # the features are those the model gives the same (prompt, answer) as text
    lm = load_model(str(tiny), layer=1)
    emb = lm.embedder().embed(r.column("prompt"), r.column("completion"))
    np.testing.assert_allclose(np.asarray(r.features, np.float32), emb, rtol=2e-3, atol=2e-3)
    assert r.feature_spec == lm.feature_spec
    ll = r.loglik()  # log-likelihoods of exactly the answer tokens, one per character here
    assert ll is not None and (ll["logprob_tokens"] == [len(c) for c in r.column("completion")]).all()
    # resuming stores nothing twice; a longer file adds only the new pairs
    assert _collect(tiny, task, out) == 0 and len(Rollouts(out)) == 20
    _pair_file(task, 12)
    assert _collect(tiny, task, out) == 0
    assert len(Rollouts(out)) == 24 and Rollouts(out).pairs.num_rows == 12


def test_bt_and_dpo_probes_learn_a_planted_preference(tiny, tmp_path, capsys):
    train = _pair_file(tmp_path / "train.jsonl", 24)
    test = _pair_file(tmp_path / "test.jsonl", 12, start=100)
    assert _collect(tiny, train, tmp_path / "tr", "--k", "2", "--max-new-tokens", "6") == 0
    assert _collect(tiny, test, tmp_path / "te") == 0
    r = Rollouts(tmp_path / "tr")
    assert len(r) == 24 * 4 and r.column("role").count("sample") == 48
    for obj in ("bt", "dpo"):
        assert main(["train", str(tmp_path / "tr"), "--objective", obj, "--out",
                     str(tmp_path / obj), "--quiet", "--min-steps", "200"]) == 0
        capsys.readouterr()
        js = tmp_path / f"{obj}.json"
        assert main(["evaluate", str(tmp_path / "te"), "--probe", str(tmp_path / obj),
                     "--bootstrap", "200", "--json", str(js)]) == 0
        text = capsys.readouterr().out
        assert "12 pairs over 12 prompts" in text and "base logprob_sum" in text
        acc = json.loads(js.read_text())["scores"]["probe"]
        assert acc["mean"] >= 0.9 and acc["n_prompts"] == 12, (obj, acc)
    # a pairs-only folder cannot train dpo (no samples for the policy's normaliser)
    assert main(["train", str(tmp_path / "te"), "--objective", "dpo", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "use --objective bt" in capsys.readouterr().err


def test_no_pairs_samples_the_prompts_unscored(tiny, tmp_path):
    task = _pair_file(tmp_path / "p.jsonl", 3)
    out = tmp_path / "s"
    assert _collect(tiny, task, out, "--no-pairs", "--k", "2", "--max-new-tokens", "5") == 0
    r = Rollouts(out)
    assert len(r) == 6 and r.pairs is None and np.isnan(r.rewards).all()


def test_best_of_k_on_preference_prompts_with_a_judge(tiny, tmp_path, capsys):
    """Pairs train a bt probe; held-out prompts are sampled k times (--no-pairs), a judge (any
    reward function; here: counts '!') scores the samples, and `evaluate` gives the probe's
    best-of-k (beta 0) against the base sample mean, as for any task."""
    train = _pair_file(tmp_path / "train.jsonl", 24)
    test = _pair_file(tmp_path / "test.jsonl", 6, start=100)
    assert _collect(tiny, train, tmp_path / "tr") == 0
    assert main(["train", str(tmp_path / "tr"), "--objective", "bt", "--out", str(tmp_path / "bt"),
                 "--quiet", "--min-steps", "100"]) == 0
    samples = tmp_path / "te-k4"
    assert _collect(tiny, test, samples, "--no-pairs", "--k", "4", "--max-new-tokens", "8",
                    "--temperature", "1") == 0
    judge = tmp_path / "judge.py"
    judge.write_text("def bangs(prompts, completions, **_):\n"
                     "    return [float(c.count('!')) for c in completions]\n")
    assert main(["score", str(samples), "--task", f"{judge}:bangs"]) == 0
    capsys.readouterr()
    js = tmp_path / "e.json"
    assert main(["evaluate", str(samples), "--probe", str(tmp_path / "bt"), "--k", "1,4",
                 "--beta", "0", "--bootstrap", "100", "--json", str(js)]) == 0
    capsys.readouterr()
    res = json.loads(js.read_text())
    r = Rollouts(samples)
    assert res["n_prompts"] == 6 and res["pass@1"]["mean"] == pytest.approx(float(r.rewards.mean()))
    assert [p["k"] for p in res["probe"]] == [1, 4]
    # generate: best-of-k of one held-out prompt, stopping at the next human turn
    assert main(["generate", "--model", str(tiny), "--probe", str(tmp_path / "bt"), "--k", "3",
                 "--max-new-tokens", "8", "--task", "hh-harmless", "--data", str(DATA), "--all",
                 "Human: hi\nA:"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["candidates"]) == 3 and out["chosen"] == int(np.argmax(
        [c["score"] for c in out["candidates"]]))
