"""distinct-n and perplexity under a scoring model (tiny random model)."""

from __future__ import annotations

import math

import numpy as np
import torch

from qprobe.textquality import distinct_n, perplexity
from tiny_lm import build_model, build_tokenizer


def test_distinct_n_per_prompt_then_mean():
    groups = [["a b a b", "a b"], ["x y z"]]
    # prompt 1: unigrams a b a b a b -> 2/6; prompt 2: 3/3
    assert math.isclose(distinct_n(groups, 1), (2 / 6 + 1) / 2)
    # bigrams: (a b)(b a)(a b)(a b) -> 2/4; (x y)(y z) -> 1
    assert math.isclose(distinct_n(groups, 2), (0.5 + 1) / 2)
    assert math.isnan(distinct_n([["one"]], 2))


def test_perplexity_matches_a_plain_forward_and_counts_empty():
    torch.manual_seed(0)
    model, tok = build_model("llama", seed=2), build_tokenizer()
    prompts = ["the cat", "the cat", "hi"]
    comps = ["sat on", "", "there."]
    out = perplexity((model, tok, "tiny"), prompts, comps)
    assert out["n"] == 2 and out["empty"] == 1 and np.isnan(out["per_sample"][1])
    for i in (0, 2):
        p = tok(prompts[i])["input_ids"]
        c = tok(comps[i], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        lp = sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(c))
        assert math.isclose(out["per_sample"][i], math.exp(-lp / len(c)), rel_tol=1e-4)
    assert math.isclose(out["mean"], np.nanmean(out["per_sample"]), rel_tol=1e-9)
