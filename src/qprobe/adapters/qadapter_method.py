"""The Q-Adapter as an entry of the adapter method registry (`adapters/methods.py`).

Training is `train.train_qadapter`; the policy samples through the frozen base model's decode
loop with `qadapter.QAdapterHook` (so its samples carry the base model's features); the implicit
reward is R = sum_t r_t (`qadapter.forward_rewards`); the policy's log-probabilities are
log_softmax((Q + a0 log pi_0) / a).
"""

from __future__ import annotations

from typing import Any

import torch

from qprobe.adapters.methods import AdapterMethod
from qprobe.adapters.qadapter import (
    QAdapterHook,
    QAdapterParams,
    forward_rewards,
    policy_logits,
)


class QAdapterMethod(AdapterMethod):
    key = "qadapter"

    def train(self, cfg, bundle=None, say=print) -> dict[str, Any]:
        from qprobe.adapters.train import train_qadapter

        return train_qadapter(cfg, bundle, say)

    def language_model(self, peft_model, base, tokenizer, info, *, name: str, **kw: Any):
        from qprobe.backends.hf.model import HFLanguageModel

        # The loop runs the frozen base model (its features are the probes'); the hook runs the
        # adapter beside it.
        return HFLanguageModel(base, tokenizer, identity=info["base_model"], chat=info["chat"],
                               **kw)

    def decode_hook(self, peft_model, prompt_ids, k, info, pad_id):
        return QAdapterHook(peft_model, prompt_ids, k, QAdapterParams(**info["params"]),
                            pad_id=pad_id)

    def implicit_reward(self, peft_model, info, batch) -> torch.Tensor:
        return forward_rewards(peft_model, batch, QAdapterParams(**info["params"])).sum(1)

    def policy_logp(self, adapter_logits, base_logp, info) -> torch.Tensor:
        return torch.log_softmax(
            policy_logits(adapter_logits, base_logp, QAdapterParams(**info["params"])), -1)
