"""`qprobe embed`: log-likelihoods and feature sets of stored samples, checked against a plain
full forward pass, and the rollouts reader's view of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qprobe.cli import main
from qprobe.embed import EmbedConfig, embed_rollouts
from qprobe.rollouts import EMBED_DIR, Rollouts
from tiny_lm import save_tiny


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("embed")
    model = save_tiny(base / "model")
    task = base / "p.jsonl"
    with open(task, "w") as f:
        for i in range(5):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"q {i}: {'ab' * (i % 3)}="}) + "\n")
    out = base / "roll"
    assert main(["collect", "--model", str(model), "--task", str(task), "--out", str(out),
                 "--k", "3", "--max-new-tokens", "10", "--seed", "1", "--batch-prompts", "2",
                 "--layer", "1", "--no-progress"]) == 0
    return model, out


def _reference(model_dir: Path, prompt: str, completion: str, layer: int):
    """log p(completion | prompt) and block `layer`'s hidden states, from one plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        out = m(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].double(), -1)
    lp = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
    h = out.hidden_states[layer + 1][0]  # [0] is the embedding output; the last is after the norm
    return lp, len(c), h[len(p) - 1 + len(c)] if c else h[len(p) - 1], h[len(p):].mean(0) if c else h[len(p) - 1]


def test_embed_matches_a_plain_forward_and_the_stored_features(collected):
    model, out = collected
    s = embed_rollouts(EmbedConfig(rollouts=str(out), layers=[0, 1, 2], progress=False),
                       say=lambda *_: None)
    assert s["new_shards"] == 3 and s["rows"] == 15 and s["retokenised_mismatch"] == 0
    r = Rollouts(out)
    sets = r.feature_sets
    assert set(sets) == {"L1-last", "L0-last", "L0-mean", "L1-mean", "L2-last", "L2-mean"}
    ll = r.loglik()
    assert ll is not None and ll["logprob_sum"].shape == (15,)
    # The collection layer recomputed equals the features stored while sampling (float16).
    import pyarrow.parquet as pq

    chk = np.concatenate([pq.read_table(p).column("check_rel_err").to_numpy()
                          for p in sorted((out / EMBED_DIR).glob("loglik-*.parquet"))])
    assert chk.max() < 5e-3
    # What sampling recorded (logprob_sum column) equals the re-encoding's log-likelihood.
    emb = np.concatenate([pq.read_table(p).column("logprob_sum").to_numpy()
                          for p in sorted((out / EMBED_DIR).glob("loglik-*.parquet"))])
    assert "logprob_sum" in r.table.column_names
    np.testing.assert_allclose(ll["logprob_sum"], emb, rtol=1e-4, atol=1e-4)
    for i in (0, 4, 11):
        prompt, comp = r.column("prompt")[i], r.column("completion")[i]
        lp, n, last1, mean1 = _reference(model, prompt, comp, 1)
        np.testing.assert_allclose(ll["logprob_sum"][i], lp, rtol=1e-4, atol=1e-3)
        assert ll["logprob_tokens"][i] == n == r.column("num_tokens")[i]
        np.testing.assert_allclose(r.features_of("L1-last")[i], r.features[i])  # the stored set
        np.testing.assert_allclose(r.features[i], last1.numpy(), rtol=5e-3, atol=5e-3)
        np.testing.assert_allclose(r.features_of("L1-mean")[i], mean1.numpy(), rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(ll["logprob_mean"], ll["logprob_sum"] / np.maximum(ll["logprob_tokens"], 1))


def test_embed_resumes_and_refuses_other_sets(collected, tmp_path, capsys):
    """Resuming encodes exactly the shards without a log-likelihood file: those of a killed run
    and, the same way, those a folder gained since it was embedded (`qprobe run` after a raised
    limit); the shards already done are not encoded again."""
    import shutil

    _, src = collected
    out = tmp_path / "roll"
    shutil.copytree(src, out)
    shutil.rmtree(out / EMBED_DIR, ignore_errors=True)
    assert main(["embed", str(out), "--layers", "2", "--positions", "mean",
                 "--limit-shards", "1", "--no-progress"]) == 0
    r = Rollouts(out)
    assert "L2-mean" not in r.feature_sets  # not every shard yet
    first = (out / EMBED_DIR / "loglik-00000.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["embed", str(out), "--layers", "2", "--positions", "mean", "--no-progress",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["new_shards"] == summary["shards"] - 1 >= 1
    assert (out / EMBED_DIR / "loglik-00000.parquet").stat().st_mtime_ns == first
    r = Rollouts(out)
    assert "L2-mean" in r.feature_sets
    assert main(["embed", str(out), "--layers", "0", "--no-progress"]) == 2  # other sets: refused

