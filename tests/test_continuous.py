"""Continuous batching in the decode loop: prompts that join a running decode at later steps get
exactly the samples (text, tokens, log-probs, features) they get from `sample` alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qprobe.backends import SamplingParams, load_model
from tiny_lm import save_tiny

K = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny(tmp_path_factory.mktemp("cont") / "model")


def _run(model, schedule: dict[int, list[tuple[str, int]]], params):
    """Admit schedule[step] before that step (step = admit calls so far); returns the
    delivered samples per prompt and the order prompts were delivered in."""
    calls, got, order = [0], {}, []

    def admit():
        step = calls[0]
        calls[0] += 1
        return [(p, seed, (p, seed)) for p, seed in schedule.get(step, [])]

    def deliver(tag, samples):
        got[tag] = samples
        order.append(tag)

    stats = model.decode_continuous(K, params, admit, deliver)
    return got, order, stats


@pytest.mark.parametrize("position,stop", [("last", []), ("mean", ["e", "zz"])])
def test_joining_prompts_get_the_samples_they_get_alone(folder, position, stop):
    model = load_model(str(folder), layer=1, position=position, feature_dtype="float32")
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, stop=stop)
    schedule = {0: [("ab x", 1)], 2: [("cd", 2), ("a much longer prompt than the rest", 3)],
                5: [("e", 4)], 7: [("ab x", 5)]}
    got, order, stats = _run(model, schedule, params)
    assert stats["joined"] == 4 and len(got) == 5
    for (prompt, seed), samples in got.items():
        alone = model.sample([prompt], K, dataclasses.replace(params, seed=seed))[0]
        for a, b in zip(samples, alone):
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
            assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
            np.testing.assert_allclose(a.feature, b.feature, atol=1e-4)


def test_rows_leave_when_they_end_and_prompts_are_handed_out_at_once(folder):
    """A short prompt admitted late ends (and is delivered) before a long one started earlier."""
    model = load_model(str(folder), layer=1)
    long = SamplingParams(temperature=0.9, max_new_tokens=12)
    got, order, stats = _run(model, {0: [("ab x", 1)], 1: [("cd", 2)]}, long)
    assert stats["joined"] == 1 and set(got) == {("ab x", 1), ("cd", 2)}
    # with eos off (the tiny model may never end early) the earlier prompt ends first
    assert order[0] == ("ab x", 1)
    assert stats["steps"] == 13  # 12 steps of "ab x", then "cd"'s last one: none thrown away


def test_ignore_eos_runs_every_row_to_max_new_tokens(folder):
    """With every token an end-of-sequence token rows end at once, unless `ignore_eos`."""
    model = load_model(str(folder), layer=1)
    model.eos_ids = set(range(model.model.config.vocab_size))
    params = SamplingParams(temperature=0.9, max_new_tokens=6, seed=1)
    ended = model.sample(["ab x"], K, params)[0]
    assert all(s.num_tokens == 0 and s.finish_reason == "stop" for s in ended)
    on = dataclasses.replace(params, ignore_eos=True)
    full = model.sample(["ab x"], K, on)[0]
    assert all(s.num_tokens == 6 and s.finish_reason == "length" for s in full)
    got, _, _ = _run(model, {0: [("ab x", 1)]}, on)  # the open decode reads it too
    assert [s.token_ids for s in got[("ab x", 1)]] == [s.token_ids for s in full]
    assert "ignore_eos" not in params.to_dict() and on.to_dict()["ignore_eos"] is True


def test_a_dropped_prompt_leaves_at_once_and_the_others_are_unchanged(folder):
    """`drop(tag)` True takes a running prompt's rows out before the next step; it is never
    delivered; the prompts beside it get the samples they get alone; a decode whose only prompt
    is dropped ends early."""
    model = load_model(str(folder), layer=1, feature_dtype="float32")
    params = SamplingParams(temperature=0.9, max_new_tokens=12)
    calls = [0]

    def admit():
        calls[0] += 1
        return [("ab x", 1, "keep"), ("cd", 2, "drop")] if calls[0] == 1 else []

    got: dict = {}
    stats = model.decode_continuous(K, params, admit, lambda t, s: got.__setitem__(t, s),
                                    drop=lambda tag: tag == "drop" and calls[0] > 3)
    assert set(got) == {"keep"} and stats["dropped"] == 1 and stats["steps"] == 12
    alone = model.sample(["ab x"], K, dataclasses.replace(params, seed=1))[0]
    for a, b in zip(got["keep"], alone):
        assert (a.text, a.token_ids) == (b.text, b.token_ids)
        np.testing.assert_allclose(a.feature, b.feature, atol=1e-4)
    once = iter([[("cd", 2, "only")]])
    got.clear()
    stats = model.decode_continuous(K, params, lambda: next(once, []),
                                    lambda t, s: got.__setitem__(t, s), drop=lambda tag: True)
    assert got == {} and stats["dropped"] == 1 and stats["steps"] == 0
