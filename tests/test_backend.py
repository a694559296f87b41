"""The local backend and its decode loop, on tiny random models built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qprobe.backends import SamplingParams
from qprobe.backends.hf import HFLanguageModel, default_layer, resolve_layer
from qprobe.backends.hf.sampling import sample_tokens, uniforms
from qprobe.errors import QProbeError
from tiny_lm import build_model, build_tokenizer

PROMPTS = ["def add(a, b):", "hello there, how", "x"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])  # gpt2: GenericDecoder
def lm(request):
    torch.set_num_threads(1)
    return HFLanguageModel(build_model(request.param), build_tokenizer(), identity="tiny",
                           layer=-2, chat=False, feature_dtype="float32")


def test_shapes_and_spec(lm):
    out = lm.sample(PROMPTS, 3, SamplingParams(max_new_tokens=10, seed=1))
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    spec = lm.feature_spec
    assert spec.layer == 1 and spec.dim == 64 and spec.model == "tiny"
    for g in out:
        for s in g:
            assert s.feature.shape == (64,) and s.feature.dtype == np.float32
            assert np.isfinite(s.feature).all()
            assert s.finish_reason in ("stop", "length")
            assert len(s.token_ids) <= 10
            assert lm.tok.decode([s.token_ids])[0] == s.text  # char tokens: text and ids agree


def test_greedy_matches_transformers_generate(lm):
    """Our decode loop (shared prompt cache, left padding) reproduces HF greedy decoding."""
    out = lm.sample(PROMPTS, 2, SamplingParams(temperature=0, max_new_tokens=12))
    tok = lm.tok.tokenizer
    for prompt, group in zip(PROMPTS, out):
        ids = torch.tensor([lm.tok.prompt_ids(prompt)])
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, pad_token_id=tok.eos_token_id)
        ref_ids = ref[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref_ids:
            ref_ids = ref_ids[: ref_ids.index(tok.eos_token_id)]
        for s in group:
            assert s.token_ids == ref_ids


@pytest.mark.parametrize("position", ["last", "mean"])
def test_generation_features_equal_reencoded(position):
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("llama", seed=3), build_tokenizer(), identity="tiny",
                         layer=1, position=position, chat=False, feature_dtype="float32")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, stop=["e", "\n"], seed=5)
    out = lm.sample(PROMPTS, 4, params)
    reasons = {s.finish_reason for g in out for s in g}
    assert reasons == {"stop", "length"}  # both the stop-string cut and full-length rows
    prompts = [p for p, g in zip(PROMPTS, out) for _ in g]
    texts = [s.text for g in out for s in g]
    gen = np.stack([s.feature for g in out for s in g])
    ref = lm.embedder().embed(prompts, texts)
    np.testing.assert_allclose(gen, ref, rtol=1e-4, atol=1e-4)


def test_finished_rows_leave_the_batch():
    """A row that stops early is no longer computed while its group's other rows go on, and a
    group whose rows have all stopped leaves too; the rows that go on are the same as in a run
    where nothing stops (same seed), and every feature equals the re-encoded one."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("qwen2", seed=4), build_tokenizer(), identity="tiny",
                         layer=1, chat=False, feature_dtype="float32")
    prompts = ["def add(a, b):", "hello there, how", "x", "yes", "zzz", "qq"]
    stop = ["e", "a", "o", "i", " ", "t"]
    free = lm.sample(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=16, seed=9))
    seen: list[tuple[int, int]] = []  # (computed rows, live prompt groups) at each step
    step = lm._dec.step

    def spy(state, tok, *a, **kw):
        seen.append((tok.shape[0], state["bias"].shape[0]))
        return step(state, tok, *a, **kw)

    lm._dec.step = spy
    cut = lm.sample(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=16, seed=9, stop=stop))
    assert any(n % 2 for n, _ in seen)  # a group ran with only part of its rows
    assert any(1 < g < len(prompts) for _, g in seen)  # a finished group left, others went on
    n_same = 0
    for gf, gc in zip(free, cut):
        for f, c in zip(gf, gc):
            assert c.token_ids == f.token_ids[: len(c.token_ids)]
            if not any(st in f.text for st in stop):
                n_same += 1
                assert c.token_ids == f.token_ids
                np.testing.assert_allclose(c.feature, f.feature, rtol=1e-4, atol=1e-4)
    assert n_same >= 1
    ref = lm.embedder().embed([p for p in prompts for _ in range(2)], [c.text for g in cut for c in g])
    np.testing.assert_allclose(np.stack([c.feature for g in cut for c in g]), ref, rtol=1e-4, atol=1e-4)


def test_prefill_in_chunks_changes_nothing(monkeypatch):
    """Long prompt batches are prefilled a few prompts at a time, shortest first, each chunk
    padded to its own longest prompt; the samples and features are those of one prefill."""
    from qprobe.backends.hf import llama

    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("llama", seed=6), build_tokenizer(), identity="tiny",
                         layer=1, chat=False, feature_dtype="float32")
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=2, stop=["e"])
    whole = lm.sample(PROMPTS, 3, params)
    calls = []
    prefill = lm._dec._prefill
    monkeypatch.setattr(lm._dec, "_prefill", lambda ids, *a: (calls.append(len(ids)), prefill(ids, *a))[1])
    monkeypatch.setattr(llama, "PREFILL_TOKENS", 30)  # 1 + 14 tokens, then 16
    parts = lm.sample(PROMPTS, 3, params)
    assert calls == [2, 1]
    assert [s.token_ids for g in parts for s in g] == [s.token_ids for g in whole for s in g]
    np.testing.assert_allclose(np.stack([s.feature for g in parts for s in g]),
                               np.stack([s.feature for g in whole for s in g]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_prefix_runs_once_and_changes_nothing(arch, monkeypatch):
    """Tokens every prompt of a batch starts with (a few-shot prefix) are prefilled once and
    shared; samples, features and greedy output are those of the plain path."""
    from qprobe.backends.hf import loop

    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model(arch, seed=8), build_tokenizer(), identity="tiny",
                         layer=1, chat=False, feature_dtype="float32")
    prompts = ["Solve each one. Show only the answer.\n" + p for p in PROMPTS]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=4, stop=["e"])
    seen = []
    prefill = lm._dec.prefill
    monkeypatch.setattr(lm._dec, "prefill", lambda ids, valid, layer, prefix=None: (
        seen.append(0 if prefix is None else len(prefix)), prefill(ids, valid, layer, prefix))[1])
    shared = lm.sample(prompts, 3, params)
    greedy = lm.sample(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12))
    monkeypatch.setattr(loop, "MIN_SHARED_PREFIX", 10**9)
    plain = lm.sample(prompts, 3, params)
    assert seen == [38, 38, 0]  # the 38 characters of the instruction, once per batch
    assert [s.token_ids for g in shared for s in g] == [s.token_ids for g in plain for s in g]
    np.testing.assert_allclose(np.stack([s.feature for g in shared for s in g]),
                               np.stack([s.feature for g in plain for s in g]), rtol=1e-4, atol=1e-4)
    ref = lm.embedder().embed([p for p in prompts for _ in range(3)], [s.text for g in shared for s in g])
    np.testing.assert_allclose(np.stack([s.feature for g in shared for s in g]), ref, rtol=1e-4, atol=1e-4)
    tok = lm.tok.tokenizer
    for prompt, g in zip(prompts, greedy):
        ids = torch.tensor([lm.tok.prompt_ids(prompt)])
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert g[0].token_ids == out


def test_seeded_determinism_and_batch_independence(lm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    a = lm.sample(PROMPTS, 4, params)
    b = lm.sample(PROMPTS, 4, params)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    # The k samples of one prompt differ from each other, and another seed changes them.
    assert len({tuple(s.token_ids) for s in a[0]}) > 1
    c = lm.sample(PROMPTS, 4, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=8))
    assert [[s.token_ids for s in g] for g in a] != [[s.token_ids for s in g] for g in c]
    # A prompt's samples do not depend on the other prompts in its batch.
    alone = lm.sample(PROMPTS[1:2], 4, params)
    assert [s.token_ids for s in alone[0]] == [s.token_ids for s in a[1]]


def test_stop_strings_cut_text_and_tokens(lm):
    base = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=20, seed=3)
    free = lm.sample(PROMPTS, 3, base)
    # Choose a stop string from the middle of a real completion; with the same seed the
    # stopped run is the free run cut before the first occurrence.
    text = max((s.text for g in free for s in g), key=len)
    stop = text[8:10]
    assert len(stop) == 2
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=20, seed=3, stop=[stop])
    cut = lm.sample(PROMPTS, 3, params)
    n_stopped = 0
    for gf, gc in zip(free, cut):
        for f, c in zip(gf, gc):
            assert stop not in c.text
            i = f.text.find(stop)
            if i >= 0:
                n_stopped += 1
                assert c.text == f.text[:i] and c.finish_reason == "stop"
                # Kept tokens: a prefix of the free run whose text lies inside the cut text.
                n = len(c.token_ids)
                assert c.token_ids == f.token_ids[:n]
                kept = lm.tok.decode([c.token_ids])[0]
                assert c.text.startswith(kept)
                assert len(lm.tok.decode([f.token_ids[: n + 1]])[0]) > len(c.text)
            else:
                assert c.text == f.text
    assert n_stopped >= 1


def test_eos_ends_a_completion():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    lm = HFLanguageModel(build_model("llama"), tok, identity="tiny", chat=False)
    probe = lm.sample(["abc"], 1, SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    # Declare the first greedy token to be EOS: generation must end before it, empty text.
    lm.eos_ids = {probe.token_ids[0]}
    s = lm.sample(["abc"], 2, SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    assert s.text == "" and s.token_ids == [] and s.finish_reason == "stop"
    emb = lm.embedder().embed(["abc"], [""])
    np.testing.assert_allclose(s.feature.astype(np.float32), emb[0], rtol=1e-2, atol=1e-2)


def test_generic_decoder_matches_fast_decoder():
    """The transformers-forward fallback and qprobe's own forward give the same samples."""
    from qprobe.backends.hf.generic import GenericDecoder
    from qprobe.backends.hf.llama import FastDecoder

    torch.set_num_threads(1)
    model, tok = build_model("llama", seed=2), build_tokenizer()
    fast = HFLanguageModel(model, tok, identity="t", layer=1, chat=False, feature_dtype="float32")
    slow = HFLanguageModel(model, tok, identity="t", layer=1, chat=False, feature_dtype="float32")
    slow._dec = GenericDecoder(model)
    assert isinstance(fast._dec, FastDecoder)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3, stop=["e"])
    a, b = fast.sample(PROMPTS, 4, params), slow.sample(PROMPTS, 4, params)
    assert [s.token_ids for g in a for s in g] == [s.token_ids for g in b for s in g]
    np.testing.assert_allclose(np.stack([s.feature for g in a for s in g]),
                               np.stack([s.feature for g in b for s in g]), rtol=1e-4, atol=1e-4)


def test_sample_tokens_matches_nucleus_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 2.0
    for top_p in (0.5, 0.999):  # 0.999 needs more than the 64-token prefilter: full-sort path
        n = 20000
        u = uniforms(np.arange(n, dtype=np.uint64) * np.uint64(7919), 0)
        toks = sample_tokens(logits.expand(n, -1).contiguous(), 1.0, top_p, u).numpy()
        probs = torch.softmax(logits[0].double(), -1).numpy()
        order = np.argsort(-probs)
        keep = order[: int((np.cumsum(probs[order]) < top_p).sum()) + 1]
        assert set(np.unique(toks)) <= set(keep.tolist())
        expect = probs[keep] / probs[keep].sum()
        freq = np.bincount(toks, minlength=300)[keep] / n
        assert np.abs(freq - expect).max() < 0.02
    assert (sample_tokens(logits, 0.0, 0.9, np.zeros(1)) == logits.argmax(-1)).all()


def test_layer_resolution():
    assert default_layer(32) == 25  # the paper's block 26 of 32
    assert resolve_layer(-1, 30) == 29 and resolve_layer(3, 30) == 3
    with pytest.raises(QProbeError):
        resolve_layer(30, 30)
    with pytest.raises(QProbeError):
        SamplingParams(top_p=0)


# -- log-probabilities and the step hook -------------------------------------------------------
def _reencoded_logprob_sums(lm, prompts: list[str], groups) -> np.ndarray:
    """One fp32 forward of prompt + completion ids through transformers: sum of log_softmax at
    each kept completion token."""
    out = []
    for prompt, group in zip(prompts, groups):
        p_ids = lm.tok.prompt_ids(prompt)
        for s in group:
            ids = torch.tensor([p_ids + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)  # [T, V]
            pos = torch.arange(len(p_ids) - 1, ids.shape[1] - 1)
            out.append(float(logp[pos, ids[0, len(p_ids):]].sum()))
    return np.array(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # gpt2: GenericDecoder
def test_recorded_logprobs_equal_a_reencoding(arch):
    """logprob_sum is the model's own log-likelihood (temperature 1, no top-p) of exactly the
    kept tokens: EOS and the tokens a stop string cut off are not counted."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model(arch, seed=11), build_tokenizer(), identity="tiny", layer=1,
                         chat=False, feature_dtype="float32", max_batch_rows=8)
    lm.eos_ids = {lm.tok.completion_ids("a")[0]}  # a frequent token ends rows by "EOS"
    prompts = ["Solve each one. Show only the answer.\n" + p for p in PROMPTS] + ["q"]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=14, stop=["e", "x"], seed=2)
    out = lm.sample(prompts, 3, params)
    flat = [s for g in out for s in g]
    assert {s.finish_reason for s in flat} == {"stop", "length"}
    got = np.array([s.logprob_sum for s in flat])
    assert (got <= 0).all() and (got < 0).any()
    np.testing.assert_allclose(got, _reencoded_logprob_sums(lm, prompts, out), rtol=1e-4, atol=1e-4)


def test_logprobs_count_only_the_tokens_kept_before_a_stop_string():
    """A stop string ending inside a token drops that token; its log-prob is not in the sum."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("llama", seed=1), build_tokenizer(), identity="tiny",
                         layer=1, chat=False)
    free = lm.sample(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=12, seed=6))
    text = max((s.text for g in free for s in g), key=len)
    cut = lm.sample(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=12, seed=6,
                                               stop=[text[5:7]]))
    shorter = 0
    for gf, gc in zip(free, cut):
        for f, c in zip(gf, gc):
            n = len(c.token_ids)
            assert c.token_ids == f.token_ids[:n]
            if n < len(f.token_ids):
                shorter += 1
                assert c.logprob_sum > f.logprob_sum  # fewer (negative) terms
    assert shorter >= 1
    np.testing.assert_allclose([s.logprob_sum for g in cut for s in g],
                               _reencoded_logprob_sums(lm, PROMPTS, cut), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_hook_sees_the_live_rows_and_can_force_tokens(arch):
    """The hook gets each live row's identity, tokens so far and feature-layer hidden state
    (equal to the re-encoded feature of the completion so far), and the tokens it forces are the
    tokens sampled; the recorded log-probs stay the model's own."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model(arch, seed=4), build_tokenizer(), identity="tiny", layer=1,
                         chat=False, feature_dtype="float32", max_batch_rows=6)
    forced = lm.tok.completion_ids("Z")[0]
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=10, stop=["e"], seed=3)
    seen = []

    def hook(step, hidden, logits, rows):
        assert hidden.shape == (len(rows.prompt), 64) and logits.shape[0] == len(rows.prompt)
        assert rows.tokens.shape == (len(rows.prompt), step)
        seen.append((step, rows.prompt.copy(), rows.sample.copy(), rows.tokens.copy(),
                     hidden.clone()))
        if step != 2:
            return None
        new = logits.clone()
        odd = torch.from_numpy(rows.sample % 2 == 1)  # force "Z" on every odd sample at step 2
        new[odd] = float("-inf")
        new[odd, forced] = 0.0
        return new

    out = lm.sample(PROMPTS, 3, params, hook=hook)  # 6 rows per batch: 2 prompts, then 1
    assert {tuple(np.unique(p)) for _, p, _, _, _ in seen} >= {(0, 1), (2,)}
    for i, g in enumerate(out):
        for j, s in enumerate(g):
            if j % 2 == 1 and len(s.token_ids) > 2:
                assert s.token_ids[2] == forced
            # every row took part in every step until it ended, with its own tokens so far
            steps = [(st, toks[(p == i) & (sm == j)]) for st, p, sm, toks, _ in seen
                     if ((p == i) & (sm == j)).any()]
            assert len(steps) >= len(s.token_ids)
            for st, toks in steps[: len(s.token_ids) + 1]:
                assert toks[0].tolist() == s.token_ids[:st]
    assert any(j % 2 == 1 and len(s.token_ids) > 2 for g in out for j, s in enumerate(g))
    # hidden = the feature of prompt + the tokens so far (the Q-probe feature of a partial answer)
    emb = lm.embedder()
    for _, p, _, toks, hidden in seen[:: max(1, len(seen) // 5)]:
        ref = emb.embed_tokens([lm.tok.prompt_ids(PROMPTS[i]) for i in p], toks.tolist())
        np.testing.assert_allclose(hidden.numpy(), ref, rtol=1e-4, atol=1e-4)
    # log-probs are the model's, also for the forced tokens
    np.testing.assert_allclose([s.logprob_sum for g in out for s in g],
                               _reencoded_logprob_sums(lm, PROMPTS, out), rtol=1e-4, atol=1e-4)


def test_a_hook_that_forces_eos_ends_every_row():
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("qwen2", seed=2), build_tokenizer(), identity="tiny",
                         layer=1, chat=False)
    eos = next(iter(lm.eos_ids))
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=8)
    free = lm.sample(PROMPTS, 2, params)

    def end_at_3(step, hidden, logits, rows):
        if step < 3:
            return None
        new = torch.full_like(logits, float("-inf"))
        new[:, eos] = 0.0
        return new

    cut = lm.sample(PROMPTS, 2, params, hook=end_at_3)
    for gf, gc in zip(free, cut):
        for f, c in zip(gf, gc):
            assert c.token_ids == f.token_ids[:3] and c.finish_reason == "stop"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_hook_that_changes_nothing_changes_no_bit(arch):
    """hook=None and a hook returning None (or the logits themselves) give the same tokens,
    features and log-probs, bit for bit."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model(arch, seed=9), build_tokenizer(), identity="tiny", layer=1,
                         chat=False, feature_dtype="float32")
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, stop=["e"], seed=1)
    calls = []
    runs = [lm.sample(PROMPTS, 3, params),
            lm.sample(PROMPTS, 3, params, hook=lambda s, h, lg, r: calls.append(s)),
            lm.sample(PROMPTS, 3, params, hook=lambda s, h, lg, r: lg)]
    assert calls and calls[0] == 0
    key = [[(s.token_ids, s.text, s.finish_reason, s.feature.tobytes(), s.logprob_sum)
            for g in run for s in g] for run in runs]
    assert key[0] == key[1] == key[2]


def test_the_registry_picks_the_backend(tmp_path):
    """An explicit key picks the backend; without one an http(s):// model is the OpenAI
    backend and anything else the local one. Imports stay lazy."""
    import subprocess
    import sys

    import qprobe
    from qprobe.backends import BACKENDS, load_model, resolve
    from qprobe.backends.openai import OpenAIBackend
    from tiny_lm import save_tiny

    assert set(BACKENDS) == {"hf", "openai", "adapter"}
    assert resolve("http://127.0.0.1:8000").key == "openai" and resolve("https://h/v1").key == "openai"
    assert resolve(None).key == resolve("default").key == resolve("org/model").key == "hf"
    assert resolve("org/model", backend="openai").key == "openai"
    assert not resolve("http://h").own_features and resolve(None).own_features
    with pytest.raises(QProbeError, match="unknown backend 'vllm'; known: hf, openai, adapter"):
        resolve("x", backend="vllm")
    with pytest.raises(QProbeError, match="base URL"):  # the key wins over the name's form
        load_model("some/folder", backend="openai")
    api = qprobe.load_model("http://127.0.0.1:1", model="m", layer=3)  # local options ignored
    assert isinstance(api, OpenAIBackend) and api.name == "m" and api.max_batch_rows == 128
    assert api.feature_spec is None and api.chat is False
    torch.set_num_threads(1)
    local = load_model(str(save_tiny(tmp_path / "tiny")), backend="hf", chat=False, layer=1)
    assert isinstance(local, HFLanguageModel) and local.feature_spec.layer == 1
    code = "import qprobe.backends, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("position", ["last", "mean"])
def test_the_embedder_runs_a_shared_prompt_once_with_the_same_features(position):
    """k completions of one prompt go after one prompt pass (GroupEncoder); their features are
    those of each pair embedded alone, empty completions included."""
    torch.set_num_threads(1)
    lm = HFLanguageModel(build_model("llama", seed=3), build_tokenizer(), identity="tiny",
                         layer=1, position=position, chat=False, feature_dtype="float32")
    emb = lm.embedder()
    prompts = ["def add(a, b):"] * 3 + ["hello"] + ["x y"] * 2
    texts = [" return a + b", "", " pass\n", " world", " z", " and more words here"]
    together = emb.embed(prompts, texts)
    alone = np.concatenate([emb.embed([p], [t]) for p, t in zip(prompts, texts)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(together[0], together[2])  # the rows differ: no copying
