"""Q-Adapter (Li et al., arXiv 2407.03856): a LoRA adapter whose logits are a residual Q-function.

The base model pi_0 stays frozen. With the adapter on, the model's logits are Q(s, .) for the
state s (the tokens so far); the new policy and the soft value are

    pi(a | s) = softmax((Q(s, .) + a0 log pi_0(. | s)) / a)[a]
    V(s)      = a logsumexp((Q(s, .) + a0 log pi_0(. | s)) / a)

so that a log pi(a|s) = Q(s, a) + a0 log pi_0(a|s) - V(s). The reward the adapter implies for
action a_t in state s_t is the inverse soft Bellman equation, r_t = Q(s_t, a_t) - gamma V(s_{t+1}),
with V = 0 after the last action (the answer is over). A sequence's reward is the sum over its
answer tokens, R = sum_t r_t, and training fits the preference pairs by Bradley-Terry on
(R_chosen, R_rejected) plus beta * mean_t r_t^2 (the chi^2 regulariser of the paper):

    loss = -mean_pairs log sigmoid(R_chosen - R_rejected) + beta * mean_tokens(r^2)

Decisions, where the public code (mansicer/Q-Adapter) differs (docs/preferences.md says why):
- V(s_{t+1}), not V(s_t): the derivation's Bellman equation has the next state. With gamma = 1
  the sum telescopes, R = sum_t (a log pi - a0 log pi_0)(a_t|s_t) + V(s_0); V(s_0) is the same for
  both answers of a pair, so the Bradley-Terry term equals the public code's same-position sum,
  while the per-token rewards (and so the regulariser) are the derivation's.
- R is a plain sum: the public code divides it by the batch's padded length, a scale that
  changes from batch to batch; here no length normalisation.
- The actions are exactly the answer tokens (the public mask is shifted by one: it drops the
  first answer token and counts the one after the last).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class QAdapterParams:
    """The Q-Adapter's constants (the paper's defaults)."""

    a: float = 1.0  # alpha-tilde: temperature of the new policy
    a0: float = 0.01  # alpha_0: weight of the base log-policy inside it
    gamma: float = 1.0
    beta: float = 0.1  # weight of mean r^2

    def to_dict(self) -> dict:
        return asdict(self)


def policy_logits(q: torch.Tensor, base_logp: torch.Tensor, p: QAdapterParams) -> torch.Tensor:
    """Logits of the new policy: (Q + a0 log pi_0) / a. [.., V] -> [.., V]."""
    return (q + p.a0 * base_logp) / p.a


def token_rewards(q: torch.Tensor, base_logp: torch.Tensor, actions: torch.Tensor,
                  action_mask: torch.Tensor, p: QAdapterParams) -> torch.Tensor:
    """Per-token rewards r [B, T-1] (0 off the answer).

    q, base_logp: [N, V] at the N action states (the True entries of action_mask [B, T-1], in
    row-major order); actions: [N] the tokens taken there."""
    v = p.a * torch.logsumexp(policy_logits(q, base_logp, p), dim=-1)  # [N] V(s_t)
    q_sa = q.gather(1, actions[:, None]).squeeze(1)  # [N]
    v_full = torch.zeros(action_mask.shape, dtype=q.dtype, device=q.device)  # [B, T-1]
    v_full = v_full.masked_scatter(action_mask, v)
    # V(s_{t+1}) where t+1 is an action state too; 0 after the last action (terminal)
    v_next = torch.cat([v_full[:, 1:], v_full.new_zeros(v_full.shape[0], 1)], dim=1)
    r = torch.zeros_like(v_full).masked_scatter(action_mask, q_sa) - p.gamma * v_next
    return r * action_mask


def qadapter_loss(r: torch.Tensor, action_mask: torch.Tensor, p: QAdapterParams
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry on sequence rewards plus beta * mean(r^2). r, action_mask: [2B, T-1], rows
    chosen 0..B-1 then rejected B..2B-1 (`data.batch_tensors`)."""
    big_r = r.sum(1)  # [2B]
    b = big_r.shape[0] // 2
    margin = big_r[:b] - big_r[b:]  # [B] R_chosen - R_rejected
    pref = -F.logsigmoid(margin).mean()
    reg = p.beta * (r**2).sum() / action_mask.sum().clamp_min(1)
    with torch.no_grad():
        stats = {"pref_loss": float(pref), "reg_loss": float(reg),
                 "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}
    return pref + reg, stats


def action_logits(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  action_mask: torch.Tensor) -> torch.Tensor:
    """The LM head's logits at the action states only: [N, V] float32 (the vocabulary-wide
    logits of prompt positions are never formed: they would dominate memory); float32, or
    float64 for a float64 model (the tests' finite differences)."""
    trunk = getattr(causal_lm, causal_lm.base_model_prefix)  # .model (Llama), .transformer (GPT-2)
    h = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = causal_lm.get_output_embeddings()(h[:, :-1][action_mask])  # [N, V]
    return logits if logits.dtype == torch.float64 else logits.float()


def forward_rewards(peft_model, batch: dict[str, torch.Tensor], p: QAdapterParams
                    ) -> torch.Tensor:
    """Per-token rewards [2B, T-1] of a batch: one forward with the adapter (Q, with grad), one
    without it (log pi_0, no grad)."""
    lm = peft_model.get_base_model()
    ids, att, act = batch["input_ids"], batch["attention_mask"], batch["action_mask"]
    q = action_logits(lm, ids, att, act)  # [N, V]
    with torch.no_grad(), peft_model.disable_adapter():
        base_logp = torch.log_softmax(action_logits(lm, ids, att, act), dim=-1)  # [N, V]
    return token_rewards(q, base_logp, ids[:, 1:][act], act, p)


class QAdapterHook:
    """Samples from the Q-Adapter policy inside qprobe's decode loop (`loop.StepHook`).

    The loop runs the frozen base model and hands each step's logits to the hook; the hook runs
    the adapter model on the same tokens (its own KV cache, one token per live row per step) and
    returns (Q + a0 log_softmax(base logits)) / a: two forwards per step, one each. Sample with
    temperature 1 and top-p 1 to draw from the Q-Adapter policy itself.

    prompt_ids: the token ids of every prompt given to `sample`, in order; k: samples each."""

    def __init__(self, peft_model, prompt_ids: list[list[int]], k: int, p: QAdapterParams,
                 pad_id: int = 0) -> None:
        self.lm = peft_model.get_base_model()
        self.prompt_ids, self.k, self.p, self.pad = prompt_ids, k, p, pad_id
        self.dev = next(self.lm.parameters()).device
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before).
        self._cache_kw = ("cache" if "cache" in inspect.signature(self.lm.forward).parameters
                          else "past_key_values")
        self._keys = None  # [A] row = prompt * k + sample of the cached rows

    @torch.no_grad()
    def __call__(self, step, hidden, logits, rows):
        import numpy as np
        from transformers import DynamicCache

        keys = rows.prompt * self.k + rows.sample  # [A], ascending
        if step == 0:
            prompts = list(dict.fromkeys(rows.prompt.tolist()))  # in row order
            toks = [self.prompt_ids[i] for i in prompts]
            t0 = max(len(t) for t in toks)
            ids = torch.full((len(toks), t0), self.pad, dtype=torch.long)
            mask = torch.zeros((len(toks), t0), dtype=torch.long)
            for i, t in enumerate(toks):  # left padding, as the loop does
                ids[i, t0 - len(t):] = torch.tensor(t)
                mask[i, t0 - len(t):] = 1
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            self.cache = DynamicCache(config=self.lm.config)
            out = self.lm(input_ids=ids.to(self.dev), attention_mask=mask.to(self.dev),
                          position_ids=pos.to(self.dev), **{self._cache_kw: self.cache}, use_cache=True)
            if len(keys) != len(prompts) * self.k:
                raise ValueError("QAdapterHook: every prompt needs its k rows at step 0")
            self.cache.batch_repeat_interleave(self.k)
            self.mask = mask.to(self.dev).repeat_interleave(self.k, 0)  # [A, T0]
            self.next_pos = (mask.sum(1)).to(self.dev).repeat_interleave(self.k, 0)  # [A]
            self.q = out.logits[:, -1].float().repeat_interleave(self.k, 0)  # [A, V]
        else:
            keep = np.nonzero(np.isin(self._keys, keys))[0]
            if len(keep) < len(self._keys):
                sel = torch.from_numpy(keep).to(self.dev)
                self.cache.batch_select_indices(sel)
                self.mask, self.next_pos = self.mask[sel], self.next_pos[sel]
            last = torch.as_tensor(rows.tokens[:, -1:], dtype=torch.long, device=self.dev)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(keys), 1)], dim=1)
            out = self.lm(input_ids=last, attention_mask=self.mask,
                          position_ids=self.next_pos[:, None], **{self._cache_kw: self.cache},
                          use_cache=True)
            self.next_pos = self.next_pos + 1
            self.q = out.logits[:, -1].float()
        self._keys = keys
        base_logp = torch.log_softmax(logits.float(), dim=-1)
        return policy_logits(self.q.to(logits.device), base_logp, self.p)
