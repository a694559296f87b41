"""Q-Adapter on a tiny model: the loss against a hand computation, its gradient by finite
differences, the chosen/rejected order, the zero adapter as the re-tempered base policy, the
decode-loop hook against full forwards, and a resumed training run equal to an unbroken one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from qprobe.adapters.data import TokenPair, batch_tensors  # noqa: E402
from qprobe.adapters.qadapter import (  # noqa: E402
    QAdapterHook,
    QAdapterParams,
    forward_rewards,
    policy_logits,
    qadapter_loss,
)
from qprobe.adapters.train import AdaptConfig, add_lora, load_adapter, train_qadapter  # noqa: E402
from tiny_lm import build_model, build_tokenizer  # noqa: E402

P = QAdapterParams(a=0.7, a0=0.3, gamma=0.9, beta=0.2)  # not the defaults: every term shows


def _lora_model(seed: int = 0, dtype=torch.float64, kind: str = "llama"):
    torch.set_num_threads(1)
    model = build_model(kind, seed=seed).to(dtype)
    for q in model.parameters():
        q.requires_grad_(False)
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    pm = add_lora(model, AdaptConfig(out="-", lora_r=4, lora_dropout=0.0, seed=seed,
                                     target_modules=targets))
    with torch.no_grad():  # a non-zero adapter (peft starts B at 0)
        g = torch.Generator().manual_seed(seed + 1)
        for n, q in pm.named_parameters():
            if "lora_B" in n:
                q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) * 0.3)
    return pm.eval()


PAIRS = [TokenPair("a", [1, 10, 11, 12], [20, 21, 2], [22, 2]),
         TokenPair("b", [1, 13, 14], [23, 2], [24, 25, 26, 2])]


def _hand_loss(pm, pairs, p: QAdapterParams):
    """Loops over sequences and answer tokens with full-vocabulary logits of whole sequences."""
    rewards, sq, n_tok = {}, 0.0, 0
    for pr in pairs:
        for role in ("chosen", "rejected"):
            seq = pr.prompt + getattr(pr, role)
            ids = torch.tensor([seq])
            q = pm(input_ids=ids).logits[0]  # [T, V]
            with torch.no_grad(), pm.disable_adapter():
                logp0 = torch.log_softmax(pm(input_ids=ids).logits[0], -1)
            n = len(pr.prompt)
            total = 0.0
            for t in range(n - 1, len(seq) - 1):  # state t, action seq[t + 1]
                v_next = 0.0
                if t + 1 < len(seq) - 1:
                    v_next = p.a * torch.logsumexp((q[t + 1] + p.a0 * logp0[t + 1]) / p.a, -1)
                r = q[t, seq[t + 1]] - p.gamma * v_next
                total = total + r
                sq = sq + r**2
                n_tok += 1
            rewards[(pr.prompt_id, role)] = total
    bt = sum(-torch.nn.functional.logsigmoid(rewards[(pr.prompt_id, "chosen")]
                                             - rewards[(pr.prompt_id, "rejected")])
             for pr in pairs) / len(pairs)
    return bt + p.beta * sq / n_tok, rewards


def test_loss_matches_a_hand_computation_and_pins_the_order():
    pm = _lora_model()
    batch = batch_tensors(PAIRS, pad_id=2)
    r = forward_rewards(pm, batch, P)
    loss, stats = qadapter_loss(r, batch["action_mask"], P)
    want, rew = _hand_loss(pm, PAIRS, P)
    assert float(loss) == pytest.approx(float(want), rel=1e-9)
    # rows 0..B-1 are the chosen answers: swapping the roles changes the sign of every margin
    big_r = r.sum(1)
    for i, pr in enumerate(PAIRS):
        assert float(big_r[i]) == pytest.approx(float(rew[(pr.prompt_id, "chosen")]), rel=1e-9)
        assert float(big_r[2 + i]) == pytest.approx(float(rew[(pr.prompt_id, "rejected")]), rel=1e-9)
    swapped = [TokenPair(p.prompt_id, p.prompt, p.rejected, p.chosen) for p in PAIRS]
    bs = batch_tensors(swapped, pad_id=2)
    _, s2 = qadapter_loss(forward_rewards(pm, bs, P), bs["action_mask"], P)
    assert s2["margin"] == pytest.approx(-stats["margin"], rel=1e-9)


def test_gamma_one_telescopes_to_the_policy_log_ratio():
    """With gamma = 1: R = sum_t (a log pi - a0 log pi_0)(a_t | s_t) + V(s_0)."""
    p = QAdapterParams(a=0.7, a0=0.3, gamma=1.0, beta=0.0)
    pm = _lora_model(seed=3)
    pr = PAIRS[0]
    seq = pr.prompt + pr.chosen
    ids = torch.tensor([seq])
    with torch.no_grad():
        q = pm(input_ids=ids).logits[0]
        with pm.disable_adapter():
            logp0 = torch.log_softmax(pm(input_ids=ids).logits[0], -1)
        logpi = torch.log_softmax(policy_logits(q, logp0, p), -1)
        n = len(pr.prompt)
        want = p.a * torch.logsumexp((q[n - 1] + p.a0 * logp0[n - 1]) / p.a, -1)
        for t in range(n - 1, len(seq) - 1):
            want += p.a * logpi[t, seq[t + 1]] - p.a0 * logp0[t, seq[t + 1]]
        r = forward_rewards(pm, batch_tensors([pr], pad_id=2), p)
    assert float(r[0].sum()) == pytest.approx(float(want), rel=1e-9)


def test_gradient_by_finite_differences():
    """On the GPT-2 architecture: Llama's RMSNorm computes in float32 even in a float64 model,
    which drowns central differences; GPT-2's LayerNorm stays in float64."""
    pm = _lora_model(seed=1, kind="gpt2")
    batch = batch_tensors(PAIRS, pad_id=2)

    def loss_value():
        return qadapter_loss(forward_rewards(pm, batch, P), batch["action_mask"], P)[0]

    loss = loss_value()
    loss.backward()
    named = [(n, q) for n, q in pm.named_parameters() if q.requires_grad]
    rng = np.random.default_rng(0)
    checked = 0
    for n, q in named[:4]:  # lora_A and lora_B of the first two blocks' attention
        for _ in range(2):
            i = tuple(int(rng.integers(s)) for s in q.shape)
            eps = 1e-6
            with torch.no_grad():
                q[i] += eps
                up = float(loss_value())
                q[i] -= 2 * eps
                down = float(loss_value())
                q[i] += eps
            fd = (up - down) / (2 * eps)
            assert float(q.grad[i]) == pytest.approx(fd, rel=1e-4, abs=1e-7), (n, i)
            checked += 1
    assert checked == 8


def test_zero_adapter_is_the_base_policy_re_tempered():
    """B = 0: Q = base logits, so the policy is softmax(((1 + a0) / a) log pi_0)."""
    torch.set_num_threads(1)
    model = build_model(seed=2).double()
    pm = add_lora(model, AdaptConfig(out="-", lora_r=4, lora_dropout=0.0)).eval()
    ids = torch.tensor([[1, 10, 11, 12, 20, 21]])
    with torch.no_grad():
        q = pm(input_ids=ids).logits[0]
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits[0]
    logp0 = torch.log_softmax(base, -1)
    got = torch.log_softmax(policy_logits(q, logp0, P), -1)
    want = torch.log_softmax(base * (1 + P.a0) / P.a, -1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_hook_q_equals_full_forwards_while_rows_finish():
    """Sampling through the decode loop: at every step the hook's Q for each live row equals
    the adapter model's logits after that row's prompt + tokens (rows leave at different steps)."""
    from qprobe.backends.base import SamplingParams
    from qprobe.backends.hf.model import HFLanguageModel

    torch.set_num_threads(1)
    base = build_model(seed=4)
    pm = _lora_model(seed=4, dtype=torch.float32)
    tok = build_tokenizer()
    lm = HFLanguageModel(base, tok, identity="tiny", layer=1, chat=False, features=False)
    prompts = ["ab: ", "hello there, ", "x"]
    ids = [lm.tok.prompt_ids(p) for p in prompts]
    hook = QAdapterHook(pm, ids, k=3, p=P, pad_id=2)
    seen = []

    def record(step, hidden, logits, rows):
        out = hook(step, hidden, logits, rows)
        seen.append((rows, hook.q.clone(), logits.clone(), out.clone()))
        return out

    groups = lm.sample(prompts, 3, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8,
                                                  stop=["e"], seed=0), hook=record)
    lens = {len(s.token_ids) for g in groups for s in g}
    assert len(lens) > 1  # some rows finish early: the hook's cache follows the compaction
    with torch.no_grad():
        for rows, q, logits, out in seen[::2]:
            for a in range(len(rows.prompt)):
                seq = ids[int(rows.prompt[a])] + rows.tokens[a].tolist()
                want = pm(input_ids=torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(q[a], want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                out, policy_logits(q, torch.log_softmax(logits, -1), P), rtol=1e-5, atol=1e-5)


def _pairs_file(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Q {i % 3}{'ab' * (i % 2)}:",
                                "chosen": f" yes {i % 4}!", "rejected": f" no {i % 5}?"}) + "\n")
    return path


def test_training_moves_towards_chosen_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    task = _pairs_file(tmp_path / "p.jsonl")
    common = dict(task=str(task), split="all", batch_pairs=4, epochs=3, lr=2e-2, lora_r=4,
                  save_every=2, chat=False, max_answer_tokens=16)
    quiet = lambda *_: None  # noqa: E731

    cfg = AdaptConfig(out=str(tmp_path / "a"), **common)
    info = train_qadapter(cfg, bundle=(build_model(), build_tokenizer(), "tiny"), say=quiet)
    assert info["steps"] == 6 and info["pairs"] == 8
    log = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["log"]
    assert log[-1]["margin"] > log[0]["margin"] + 1.0  # R_chosen - R_rejected grows

    class Crash(Exception):
        pass

    def crash_at_4(msg):
        if "step 4/" in msg:
            raise Crash

    cfg_b = AdaptConfig(out=str(tmp_path / "b"), **common)
    with pytest.raises(Crash):
        train_qadapter(cfg_b, bundle=(build_model(), build_tokenizer(), "tiny"), say=crash_at_4)
    assert not (tmp_path / "b" / "adapter.json").exists()
    train_qadapter(cfg_b, bundle=(build_model(), build_tokenizer(), "tiny"), say=quiet)
    pa, _, _, _ = load_adapter(tmp_path / "a", bundle=(build_model(), build_tokenizer(), "tiny"))
    pb, _, _, _ = load_adapter(tmp_path / "b", bundle=(build_model(), build_tokenizer(), "tiny"))
    wa = {n: q for n, q in pa.named_parameters() if "lora" in n}
    wb = {n: q for n, q in pb.named_parameters() if "lora" in n}
    assert wa.keys() == wb.keys() and len(wa) > 0
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=0)
    assert not math.isnan(info["final"]["loss"])
