"""The real embedded model: SmolLM2-135M-Instruct GGUF -> conversion cache -> sampling + features."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from qprobe import models
from qprobe.backends import SamplingParams, load_model
from qprobe.errors import QProbeError


@pytest.mark.slow
def test_smollm2_gguf_cache_sampling_and_features(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("QPROBE_CACHE", str(tmp_path / "cache"))
    gguf = models.resolve(None)
    assert gguf.name == models.DEFAULT_MODEL_FILE and gguf.is_file()
    folder = models.gguf_cache_dir(gguf)  # converts once (tens of seconds)
    assert (folder / "qprobe-source.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob(".convert-*"))  # nothing half-written left behind
    t = time.time()
    assert models.gguf_cache_dir(gguf) == folder
    assert time.time() - t < 5  # memoised hash, no reconversion

    lm = load_model("default", chat=True, feature_dtype="float32", max_batch_rows=8)
    spec = lm.feature_spec
    assert spec.model == models.DEFAULT_MODEL_FILE + "+chat" and spec.dim == 576
    assert spec.layer == 23  # about 80% of 30 blocks
    prompts = ["Write a Python function that adds two numbers.", "What is 2 + 3?"]
    params = SamplingParams(max_new_tokens=24, stop=["\n\n"], seed=0)
    out = lm.sample(prompts, 4, params)
    assert all(len(g) == 4 for g in out)
    texts = [s.text for g in out for s in g]
    assert all("\n\n" not in x for x in texts) and len(set(texts)) > 2
    # In-generation features == a fresh forward pass over the same tokens.
    emb = lm.embedder()
    p_ids = [lm.tok.prompt_ids(p) for p in prompts for _ in range(4)]
    ref = emb.embed_tokens(p_ids, [s.token_ids for g in out for s in g])
    gen = np.stack([s.feature for g in out for s in g])
    np.testing.assert_allclose(gen, ref, rtol=1e-3, atol=1e-3)
    # Recorded log-likelihoods == one fp32 forward over prompt + kept completion tokens.
    want = []
    for p, ids in zip(p_ids, [s.token_ids for g in out for s in g]):
        x = torch.tensor([p + ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=x).logits[0].double(), -1)
        want.append(float(logp[torch.arange(len(p) - 1, x.shape[1] - 1), x[0, len(p):]].sum()))
    got = [s.logprob_sum for g in out for s in g]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # Same seed, same samples.
    again = lm.sample(prompts, 4, params)
    assert [s.text for g in again for s in g] == texts


def test_resolve_errors(tmp_path):
    with pytest.raises(QProbeError, match="no such file"):
        models.resolve(str(tmp_path / "missing.gguf"))
    assert models.resolve("someone/some-model") == "someone/some-model"  # hub id: only a name
