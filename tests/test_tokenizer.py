"""The one padding fallback (`pad_id`) and why its value is free: padded rows give the same
log-likelihoods and features whatever id fills the padding."""

from __future__ import annotations

import numpy as np
import torch

from qprobe.backends.hf.encode import GroupEncoder
from qprobe.backends.hf.generic import decoder_blocks
from qprobe.backends.hf.tokenizer import PromptTokenizer, pad_id
from tiny_lm import build_model, build_tokenizer


def test_pad_id_is_the_pad_token_else_eos_else_zero():
    tok = build_tokenizer()
    assert tok.pad_token_id == 2 and pad_id(tok) == 2
    tok.pad_token = None
    tok.eos_token = "a"
    assert pad_id(tok) == tok.convert_tokens_to_ids("a") != 2
    tok.eos_token = None
    assert pad_id(tok) == 0


def test_the_padding_value_changes_no_result():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(layers=2)
    tok = PromptTokenizer(build_tokenizer(), chat=False)
    enc = GroupEncoder(model, [0, 1], decoder_blocks(model))
    # completions of different lengths: the short ones are right-padded inside a chunk
    comps = [tok.completion_ids(c) for c in ("ab", "abcdef", "x = 1", "hello there", "q")]
    runs = [enc.encode(tok.prompt_ids("def f(x):"), comps, pad) for pad in (0, 2, 17)]
    for lp, n, feats in runs[1:]:
        np.testing.assert_array_equal(lp, runs[0][0])
        np.testing.assert_array_equal(n, runs[0][1])
        for layer in (0, 1):
            for pos in ("last", "mean"):
                np.testing.assert_array_equal(feats[layer][pos], runs[0][2][layer][pos])
