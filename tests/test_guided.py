"""Token-level reward-guided decoding (RAD, ARM) on tiny random models built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qprobe.backends import SamplingParams
from qprobe.backends.hf import HFLanguageModel
from qprobe.backends.hf.sampling import candidate_probs, sample_candidates
from qprobe.errors import QProbeError
from qprobe.policy.guided import GuideConfig, GuidedHook, GuidedSampler, KVTrunk, guided_candidates
from qprobe.policy.head_train import (
    FitConfig,
    distill_arm,
    fit_arm,
    fit_rad,
    teacher_rad_raw,
    token_states,
)
from qprobe.policy.heads import RewardHead, tokenizer_identity
from tiny_lm import CHARS, SPECIALS, build_model, build_tokenizer

PROMPTS = ["def add(a, b):", "hello there, how", "x", "The cat"]
LAYER = 1


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    torch.set_num_threads(1)
    return HFLanguageModel(build_model("llama"), tok, identity="tiny", layer=LAYER, chat=False,
                           feature_dtype="float32", max_batch_rows=8)


@pytest.fixture(scope="module")
def trunk(tok):
    """A second tiny model with the same tokenizer: a separate reward model."""
    return build_model("llama", seed=7), tok, "tiny-rm"


def random_head(kind: str, spec, tok, seed: int = 0, rank: int = 4) -> RewardHead:
    torch.manual_seed(seed)
    h = RewardHead(kind, spec.dim, rank=rank, feature_spec=spec, tokenizer=tokenizer_identity(tok))
    with torch.no_grad():
        for p in h.parameters():
            p.normal_()
        h.std.fill_(3.0)
    return h.eval()


def rm_spec(lm, layer=LAYER):
    from qprobe.features import FeatureSpec

    return FeatureSpec(model="tiny-rm", layer=layer, dim=64, dtype="float32")


# -- the maths of one step ------------------------------------------------------------------

def test_guided_distribution_is_softmax_of_logits_plus_beta_r_on_the_top_k():
    """A planted reward table r[v]: the loop samples from softmax(logits + beta r) restricted
    to the top-k, exactly (probabilities to 1e-12, and the token of every uniform)."""
    g = torch.Generator().manual_seed(0)
    a, v, k, beta = 5, 50, 7, 3.5
    logits = torch.randn(a, v, generator=g) * 2
    table = torch.rand(v, generator=g)  # planted reward of each token
    cand = guided_candidates(logits, k, beta, lambda ids: table[ids])
    top = logits.topk(k, dim=-1).indices
    assert torch.equal(cand.ids, top)
    ref = torch.full((a, v), float("-inf"), dtype=torch.float64)
    ref.scatter_(1, top, (logits.gather(1, top) + beta * table[top]).double())
    p_ref = torch.softmax(ref, -1)  # [A, V]
    order, probs = candidate_probs(cand.logits, 1.0)
    p_impl = torch.zeros(a, v, dtype=torch.float64).scatter_(1, cand.ids.gather(1, order), probs)
    assert (p_impl - p_ref).abs().max() < 1e-12
    # Every uniform maps to the token the reference inverse CDF (descending probability) picks.
    us = np.random.default_rng(1).random((100, a))
    ref_sorted, ref_order = p_ref.sort(dim=-1, descending=True, stable=True)
    cum = ref_sorted.cumsum(-1)
    for u in us:
        got = sample_candidates(cand.ids, cand.logits, 1.0, 1.0, u)
        j = torch.searchsorted(cum, torch.from_numpy(u)[:, None] * cum[:, -1:], right=True)[:, 0]
        assert torch.equal(got, ref_order.gather(1, j[:, None])[:, 0])


def test_top_k_is_left_out_of_the_sampling_identity_when_off():
    """Rollouts made before top-k existed record sampling without it; they must still resume."""
    assert "top_k" not in SamplingParams().to_dict()
    assert SamplingParams(top_k=5).to_dict()["top_k"] == 5
    with pytest.raises(QProbeError, match="top_k"):
        SamplingParams(top_k=-1)


def test_beta_zero_leaves_candidates_bit_for_bit():
    logits = torch.randn(4, 30)
    cand = guided_candidates(logits, 5, 0.0, lambda ids: torch.rand(ids.shape))
    vals, ids = logits.topk(5, dim=-1)
    assert torch.equal(cand.ids, ids) and torch.equal(cand.logits, vals)


def test_inverse_and_clamp():
    head = RewardHead("rad", 4, link="identity")
    raw = torch.tensor([-0.5, 0.25, 2.0])
    from qprobe.policy.guided import shaped_reward

    assert torch.allclose(shaped_reward(head, raw, GuideConfig()), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(shaped_reward(head, raw, GuideConfig(inverse=True)),
                          torch.tensor([1.0, 0.75, 0.0]))


def test_a_pairs_head_is_not_clamped_unless_asked():
    """A head trained from preference pairs scores tokens in log-odds: the default [0, 1] clamp
    of reward heads would drop every negative score, so its default is no clamp."""
    from qprobe.policy.guided import shaped_reward

    head = RewardHead("arm", 4, rank=2, link="identity", info={"training": {"pairs": True}})
    raw = torch.tensor([-0.5, 0.25, 2.0])
    assert torch.equal(shaped_reward(head, raw, GuideConfig()), raw)
    assert torch.allclose(shaped_reward(head, raw, GuideConfig(clamp_min=0.0, clamp_max=1.0)),
                          torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(shaped_reward(head, raw, GuideConfig(clamp_max=1.0)),
                          torch.tensor([-0.5, 0.25, 1.0]))


# -- decoding ---------------------------------------------------------------------------------

PARAMS = dict(temperature=1.0, max_new_tokens=14, seed=3, stop=["e", "\n"])


@pytest.mark.parametrize(("kind", "separate", "top_p"), [
    ("arm", False, 1.0), ("rad", False, 0.8), ("arm", True, 0.8), ("rad", True, 1.0)])
def test_beta_zero_reproduces_unguided_top_k_samples(lm, tok, trunk, kind, separate, top_p):
    """beta = 0 gives exactly the samples of unguided top-k decoding with the same seed (rows
    ending at EOS / stop strings leave both batches at the same steps)."""
    ref = lm.sample(PROMPTS, 3, SamplingParams(top_k=6, top_p=top_p, **PARAMS))
    spec = rm_spec(lm) if separate else lm.feature_spec
    head = random_head(kind, spec, tok)
    g = GuidedSampler(lm, head, GuideConfig(beta=0.0, top_k=6), trunk if separate else None)
    out = g.sample(PROMPTS, 3, SamplingParams(top_p=top_p, **PARAMS))
    for ga, gb in zip(ref, out):
        for a, b in zip(ga, gb):
            assert a.token_ids == b.token_ids and a.text == b.text
            assert a.logprob_sum == b.logprob_sum
            assert np.array_equal(a.feature, b.feature)
    assert any(s.finish_reason == "stop" for gr in out for s in gr)  # rows did leave early
    want = 6.0 if kind == "rad" else (1.0 if separate else 0.0)
    calls = g.cost()["reward_calls_per_token"]
    assert (calls == 0.0) if want == 0 else (0 < calls <= want)
    guided = GuidedSampler(lm, head, GuideConfig(beta=8.0, top_k=6), trunk if separate else None)
    moved = guided.sample(PROMPTS, 3, SamplingParams(top_p=top_p, **PARAMS))
    assert any(a.token_ids != b.token_ids for ga, gb in zip(ref, moved) for a, b in zip(ga, gb))


def _hidden_of(model, layer: int, seqs: list[list[int]]) -> torch.Tensor:
    """Reference: the state after block `layer` at the last token of each sequence."""
    st = token_states(model, layer, [s[:-1] for s in seqs], [[s[-1]] for s in seqs])
    return torch.from_numpy(st.h[st.start[1:] - 1].astype(np.float32))


@pytest.mark.parametrize("separate", [False, True])
def test_rad_trunk_states_equal_a_full_forward_of_prefix_plus_candidate(lm, tok, trunk, separate):
    """The KV-cached candidate forward (cache copied from the chosen candidate, rows dropped as
    they finish) gives the states a plain forward of prompt + tokens + candidate gives."""
    spec = rm_spec(lm) if separate else lm.feature_spec
    head = random_head("rad", spec, tok)
    g = GuidedSampler(lm, head, GuideConfig(beta=4.0, top_k=4), trunk if separate else None)
    seen = []
    orig = KVTrunk.candidate_hidden

    def spy(self, step, rows, ids):
        h = orig(self, step, rows, ids)
        seen.append((rows.prompt.copy(), rows.tokens.copy(), ids.clone(), h.clone()))
        return h

    KVTrunk.candidate_hidden = spy
    try:
        g.sample(PROMPTS, 2, SamplingParams(**PARAMS))
    finally:
        KVTrunk.candidate_hidden = orig
    model = trunk[0] if separate else lm.model
    checked = 0
    for prompt, tokens, ids, h in seen[::3]:
        seqs = [lm.tok.prompt_ids(PROMPTS[p]) + list(t) + [int(c)]
                for p, t, row in zip(prompt, tokens, ids) for c in row]
        ref = _hidden_of(model, LAYER, seqs)
        assert torch.allclose(h.reshape(len(seqs), -1), ref, atol=2e-4, rtol=1e-4)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("where", ["other-model", "own-model-other-block"])
def test_arm_trunk_states_equal_a_full_forward(lm, tok, trunk, where):
    """ARM on a trunk (another model, or the sampling model read at another block than the
    loop's): the KV-cached prefix states equal a plain forward's, and beta = 0 changes nothing."""
    from qprobe.features import FeatureSpec

    if where == "other-model":
        spec, layer, model, given = rm_spec(lm), LAYER, trunk[0], trunk
    else:
        spec = FeatureSpec(model="tiny", layer=2, dim=64, dtype="float32")
        layer, model, given = 2, lm.model, None
    head = random_head("arm", spec, tok)
    g = GuidedSampler(lm, head, GuideConfig(beta=4.0, top_k=4), given)
    assert g.method == "arm-trunk"
    seen = []
    orig = KVTrunk.prefix_hidden

    def spy(self, step, rows):
        h = orig(self, step, rows)
        seen.append((rows.prompt.copy(), rows.tokens.copy(), h.clone()))
        return h

    KVTrunk.prefix_hidden = spy
    try:
        g.sample(PROMPTS, 2, SamplingParams(**PARAMS))
    finally:
        KVTrunk.prefix_hidden = orig
    for prompt, tokens, h in seen[1::2]:
        seqs = [lm.tok.prompt_ids(PROMPTS[p]) + list(t) for p, t in zip(prompt, tokens)]
        assert torch.allclose(h, _hidden_of(model, layer, seqs), atol=2e-4, rtol=1e-4)
    zero = GuidedSampler(lm, head, GuideConfig(beta=0.0, top_k=4), given)
    ref = lm.sample(PROMPTS, 2, SamplingParams(top_k=4, **PARAMS))
    out = zero.sample(PROMPTS, 2, SamplingParams(**PARAMS))
    assert [[s.token_ids for s in gr] for gr in ref] == [[s.token_ids for s in gr] for gr in out]


def test_guidance_raises_the_reward_it_is_given(lm, tok):
    """A planted reward 1[v == "a"]: the higher beta, the more often "a" is written."""
    target = tok.convert_tokens_to_ids("a")
    head = RewardHead("rad", 64, link="identity")
    counts = []
    for beta in (0.0, 3.0, 30.0):
        hook = GuidedHook(GuideConfig(beta=beta, top_k=10), head,
                          lambda step, hidden, ids, rows: (ids == target).float())
        out = lm.sample(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=12, seed=0),
                        hook=hook)
        counts.append(sum(s.text.count("a") for gr in out for s in gr))
    assert counts[0] < counts[1] < counts[2]


# -- heads: training, distillation, saving, refusing ----------------------------------------

def _rollout_states(lm, n_prompts=12, k=6, seed=0):
    prompts = [f"{w} {i}" for i, w in enumerate(["the", "a dog", "x =", "hi"] * 3)][:n_prompts]
    out = lm.sample(prompts, k, SamplingParams(temperature=1.0, max_new_tokens=10, seed=seed))
    p_ids = [lm.tok.prompt_ids(p) for p, g in zip(prompts, out) for _ in g]
    c_ids = [s.token_ids for g in out for s in g]
    keep = [i for i, c in enumerate(c_ids) if c]
    return ([p_ids[i] for i in keep], [c_ids[i] for i in keep],
            [s.text for g in out for s in g if s.token_ids])


def test_token_states_match_the_decode_loop_features(lm):
    p_ids, c_ids, _ = _rollout_states(lm, 4, 3)
    st = token_states(lm.model, LAYER, p_ids, c_ids)
    assert st.h.shape == (sum(len(c) + 1 for c in c_ids), 64)
    last = st.h[st.start[1:] - 1].astype(np.float32)  # state after each completion's last token
    emb = lm.embedder().embed_tokens(p_ids, c_ids)
    assert np.allclose(last, emb, atol=2e-2, rtol=1e-2)  # float16 storage
    assert np.array_equal(st.tokens[st.start[0] : st.start[1] - 1], c_ids[0])


def test_cumulative_mse_weights():
    from qprobe.policy.head_train import TokenStates

    st = TokenStates(np.zeros((6, 2), np.float16), np.zeros(6, np.int64), np.array([0, 4, 6]))
    idx, seq, w = st.rad_rows()
    assert idx.tolist() == [1, 2, 3, 5] and seq.tolist() == [0, 0, 0, 1]
    assert np.allclose(w, [1 / 6, 2 / 6, 3 / 6, 1.0])  # 2t / (n (n + 1))
    assert st.arm_rows()[0].tolist() == [0, 1, 2, 4]


@pytest.mark.parametrize("kind", ["rad", "arm"])
def test_heads_learn_a_token_count_reward(lm, tok, kind):
    """Label = more vowels than the median completion: a trained head's score after the last
    token ranks the training completions well above chance (a random layer-1 state of a tiny
    model carries the text only partly)."""
    p_ids, c_ids, texts = _rollout_states(lm, 12, 8)
    y = np.array([sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts])
    labels = (y > np.median(y)).astype(float)
    st = token_states(lm.model, LAYER, p_ids, c_ids)
    head = RewardHead(kind, 64, rank=8, feature_spec=lm.feature_spec,
                      tokenizer=tokenizer_identity(tok))
    emb = lm.model.get_output_embeddings().weight.detach()
    fit = FitConfig(epochs=60, lr=2e-2, batch=512)
    loss = fit_rad(st, labels, head, fit) if kind == "rad" else fit_arm(st, labels, head, fit, emb)
    assert loss < labels.var()  # better than the constant predictor
    idx, seq, _ = st.rad_rows() if kind == "rad" else st.arm_rows()
    with torch.no_grad():
        h = torch.from_numpy(st.h[idx].astype(np.float32))
        raw = head.rad_raw(h) if kind == "rad" else head.arm_raw(
            h, torch.from_numpy(st.tokens[idx])[:, None], emb)[:, 0]
    last = np.r_[seq[1:] != seq[:-1], True]  # the score after each completion's last token
    s = raw.numpy()[last]
    pos, neg = s[labels[seq[last]] == 1], s[labels[seq[last]] == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.7


def test_arm_distilled_from_an_exactly_low_rank_rad_reproduces_its_choices(lm, tok):
    """A RAD reward model whose scores are exactly low-rank in (next token, prefix state):
    r(prefix + v) = e_v^T W h(prefix) + b.h(prefix) with rank-2 W. An ARM head distilled from its
    scores of the stored text (teacher forcing) makes the same choices while decoding."""
    g = torch.Generator().manual_seed(5)
    d = 64
    emb = lm.model.get_output_embeddings().weight.detach()
    u, v = torch.randn(d, 2, generator=g) / 8, torch.randn(d, 2, generator=g) / 8
    b = torch.randn(d, generator=g) / 40

    def planted(h, ids):  # [A, D], [A, k] -> [A, k]
        return (emb[ids] @ u * (h @ v)[:, None, :]).sum(-1) + (h @ b)[:, None]

    p_ids, c_ids, _ = _rollout_states(lm, 12, 8, seed=1)
    st = token_states(lm.model, LAYER, p_ids, c_ids)
    idx, _, _ = st.arm_rows()
    h_prev = torch.from_numpy(st.h[idx].astype(np.float32))
    teacher = planted(h_prev, torch.from_numpy(st.tokens[idx])[:, None])[:, 0].numpy()
    torch.manual_seed(0)
    student = RewardHead("arm", d, rank=2, link="sigmoid", feature_spec=lm.feature_spec,
                         tokenizer=tokenizer_identity(tok))
    loss = distill_arm(st, teacher, student, FitConfig(epochs=300, lr=2e-2, batch=1024), emb)
    assert loss < 1e-4 * float(np.var(teacher))
    student.bind(emb)
    cfg = GuideConfig(beta=6.0, top_k=8)
    rad_hook = GuidedHook(cfg, student, lambda step, hidden, ids, rows: planted(hidden, ids))
    arm = GuidedSampler(lm, student, cfg)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=2)
    prompts = ["q", "the end", "what", "1 2 3"]
    ref = lm.sample(prompts, 6, params, hook=rad_hook)
    out = arm.sample(prompts, 6, params)
    same = [a.token_ids == c.token_ids for ga, gc in zip(ref, out) for a, c in zip(ga, gc)]
    assert np.mean(same) >= 0.9
    unguided = lm.sample(prompts, 6, SamplingParams(**{**params.to_dict(), "top_k": 8}))
    base_same = [a.token_ids == c.token_ids for ga, gc in zip(ref, unguided)
                 for a, c in zip(ga, gc)]
    assert np.mean(same) > np.mean(base_same) + 0.3  # the guidance does change the choices


def test_rad_teacher_scores_and_distillation_api(lm, tok):
    p_ids, c_ids, _ = _rollout_states(lm, 4, 3)
    st = token_states(lm.model, LAYER, p_ids, c_ids)
    teacher = random_head("rad", lm.feature_spec, tok)
    raw = teacher_rad_raw(st, teacher)
    assert raw.shape == (int(st.lengths.sum()),)
    with pytest.raises(QProbeError, match="teacher scores"):
        distill_arm(st, raw[:-1], RewardHead("arm", 64, rank=2), FitConfig(epochs=1),
                    lm.model.get_output_embeddings().weight)


def test_head_save_load_round_trip(lm, tok, tmp_path):
    for kind in ("rad", "arm"):
        head = random_head(kind, lm.feature_spec, tok)
        head.info = {"training": {"samples": 3}}
        head.save(tmp_path / kind)
        back = RewardHead.load(tmp_path / kind)
        assert back.kind == kind and back.feature_spec == head.feature_spec
        assert back.tokenizer == head.tokenizer and back.info == head.info
        h = torch.randn(3, 64)
        if kind == "rad":
            assert torch.equal(back.rad_raw(h), head.rad_raw(h))
        else:
            emb = torch.randn(10, 64)
            ids = torch.randint(0, 10, (3, 4))
            assert torch.allclose(back.arm_raw(h, ids, emb), head.arm_raw(h, ids, emb))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("1")
    with pytest.raises(QProbeError, match="not a reward head"):
        RewardHead.load(tmp_path / "junk")


def test_heads_refuse_a_foreign_tokenizer_or_width(lm, tok, trunk):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # Same size, other token -> id map.
    chars = list(reversed(CHARS))
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(SPECIALS + chars)}, merges=[],
                             unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    foreign = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="</s>")
    head = random_head("arm", lm.feature_spec, tok)
    other = HFLanguageModel(lm.model, foreign, identity="tiny", layer=LAYER, chat=False)
    with pytest.raises(QProbeError, match="another tokenizer"):
        GuidedSampler(other, head, GuideConfig())
    with pytest.raises(QProbeError, match="width"):
        RewardHead("rad", 32, tokenizer=tokenizer_identity(tok)).check_model(tok, 64)
    with pytest.raises(QProbeError, match="not of the sampling model"):
        GuidedSampler(lm, random_head("rad", rm_spec(lm), tok), GuideConfig())
    with pytest.raises(QProbeError, match="reward model given"):
        GuidedSampler(lm, random_head("rad", lm.feature_spec, tok), GuideConfig(), trunk)
