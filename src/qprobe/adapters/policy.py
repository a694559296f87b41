"""Sampling from an adapter's policy, and the adapters' implicit rewards on held-out pairs.

`AdapterLanguageModel` is a `LanguageModel`, loaded by the "adapter" backend key (`load_model`;
so `qprobe collect --adapter DIR` and experiments use it like any model): a Q-Adapter samples through the decode loop of the frozen base model with
`QAdapterHook` (the samples' features are the base model's, the spec of the folder's probes); a
DPO adapter is merged into a copy of the base model and sampled plainly, without features (its
hidden states are another model's).

Implicit rewards, for held-out pair accuracy: the Q-Adapter's sequence reward R = sum_t r_t, and
DPO's beta * (log pi(y|x) - log pi_ref(y|x)), both on the pairs tokenised as in training. What
each method does is its entry in the method registry (`adapters/methods.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe.backends.base import LanguageModel, Sample, SamplingParams
from qprobe.errors import QProbeError
from qprobe.policy.base import Policy


class AdapterLanguageModel(LanguageModel):
    """k samples per prompt from the policy of an adapter folder (`qprobe adapt`)."""

    def __init__(self, folder: str | Path, *, layer: int | None = None, position: str = "last",
                 features: bool = True, feature_dtype: str = "float16",
                 max_batch_rows: int | None = None, device: str | None = None,
                 bundle: tuple | None = None) -> None:
        from qprobe.adapters.methods import method
        from qprobe.adapters.train import load_adapter
        from qprobe.backends.hf.tokenizer import pad_id

        self.peft, base, tokenizer, self.info = load_adapter(folder, device, bundle)
        self.method = self.info["method"]
        self.impl = method(self.method)
        self.name = f"{self.info['base_model']}+{self.method}:{Path(folder).resolve().name}"
        self.lm = self.impl.language_model(self.peft, base, tokenizer, self.info, name=self.name,
                                           layer=layer, position=position, features=features,
                                           feature_dtype=feature_dtype,
                                           max_batch_rows=max_batch_rows)
        self.pad = pad_id(tokenizer)

    @property
    def chat(self) -> bool:
        return self.lm.chat

    @property
    def max_batch_rows(self) -> int:
        return self.lm.max_batch_rows

    @property
    def tok(self):
        """The prompt tokenizer of the decode loop (`PromptTokenizer`)."""
        return self.lm.tok

    @property
    def feature_spec(self):
        return self.lm.feature_spec

    def sample(self, prompts: list[str], k: int, params: SamplingParams, *,
               observe=None) -> list[list[Sample]]:
        """k samples per prompt from the adapter's policy; observe: the decode loop's per-step
        observer (`loop.StepObserver`), for streaming."""
        hook = self.impl.decode_hook(self.peft, [self.lm.tok.prompt_ids(p) for p in prompts], k,
                                     self.info, self.pad)
        return self.lm.sample(prompts, k, params, hook=hook, observe=observe)


def load_model(folder: str | Path, *, layer: int | None = None, position: str = "last",
               device: str | None = None, dtype: Any = None, chat: bool | None = None,
               **kw: Any) -> AdapterLanguageModel:
    """The "adapter" backend (`backends.registry`): an adapter folder's policy. The base model,
    its dtype and the chat setting are the adapter's own; `chat` given must match it. Other
    keywords (feature_dtype, max_batch_rows, features) go to `AdapterLanguageModel`."""
    if dtype is not None:
        raise QProbeError("adapter: the base model is loaded as the adapter was trained; "
                          "no dtype can be given")
    lm = AdapterLanguageModel(folder, layer=layer, position=position, device=device, **kw)
    if chat is not None and bool(chat) != lm.chat:
        raise QProbeError(f"adapter: {folder} was trained with chat={lm.chat}; "
                          f"--chat/--no-chat must match it")
    return lm


class AdapterPolicy(Policy):
    """The `qadapter` and `dpo` kinds of the policy registry: each answer is a sample of the
    adapter's policy, decided token by token (so a server can stream it)."""

    per_token = True
    needs = ("adapter",)

    @classmethod
    def build(cls, cfg: Any, ctx: Any) -> Policy:
        if not cfg.adapter:
            raise QProbeError(f"policy {ctx.kind}: give adapter=ADAPTER_DIR")
        lm = AdapterLanguageModel(cfg.adapter, features=False, device=ctx.device)
        if lm.method != ctx.kind:
            raise QProbeError(f"policy {ctx.kind}: {cfg.adapter} is a {lm.method!r} adapter; "
                              f"serve it as {lm.method}:adapter=...")
        policy = cls(cfg, lm)
        policy.kind = lm.method
        return policy

    @property
    def sampler_id(self) -> str:
        return f"adapter:{id(self.model)}"

    def sample(self, prompts, k, params, *, hook: Any = None, observe: Any = None):
        if hook is not None:
            raise QProbeError("policy adapter: no step hook can join an adapter's decode")
        return self.model.sample(prompts, k, params, observe=observe)


@torch.no_grad()
@torch.inference_mode()
def implicit_rewards(peft_model, info: dict[str, Any], pairs: list, pad_id: int,
                     batch_pairs: int = 4, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(R_chosen [n], R_rejected [n]) of tokenised pairs (`data.TokenPair`) under an adapter."""
    from tqdm.auto import tqdm

    from qprobe.adapters.data import batch_tensors
    from qprobe.adapters.methods import method

    impl = method(info["method"])
    peft_model.eval()
    lm = peft_model.get_base_model()
    dev = next(lm.parameters()).device
    out = []
    for i in tqdm(range(0, len(pairs), batch_pairs), desc="adapter rewards", unit="batch",
                  disable=not progress):
        part = pairs[i : i + batch_pairs]
        b = {k: v.to(dev) for k, v in batch_tensors(part, pad_id).items()}
        big_r = impl.implicit_reward(peft_model, info, b)
        n = len(part)
        out.append((big_r[:n].double().cpu().numpy(), big_r[n:].double().cpu().numpy()))
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def sequence_logp(logits: torch.Tensor, ids: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability [B] of its tokens `ids[:, 1:]` where `act` [B, T-1] is
    set, from logits (or log-probabilities) [N, V] at those N positions."""
    tokens = ids[:, 1:][act]  # [N]
    lp = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    full = torch.zeros(act.shape, dtype=lp.dtype, device=lp.device)
    return full.masked_scatter(act, lp).sum(1)


def evaluate_adapter(folder: str | Path, task: str, split: str, data: str | None = None,
                     limit: int | None = None, n_boot: int = 1000, seed: int = 0,
                     device: str | None = None, bundle: tuple | None = None) -> dict[str, Any]:
    """Held-out pair accuracy of an adapter's implicit reward, with a bootstrap CI over prompts."""
    from qprobe.adapters.data import tokenise_pairs
    from qprobe.adapters.train import AdaptConfig, load_adapter, load_pairs
    from qprobe.backends.hf.tokenizer import PromptTokenizer, pad_id
    from qprobe.evaluate import pair_accuracy

    peft_model, _, tokenizer, info = load_adapter(folder, device, bundle)
    c = info["config"]
    pairs = load_pairs(AdaptConfig(out=str(folder), task=task, split=split, data=data, limit=limit))
    tok = PromptTokenizer(tokenizer, info["chat"])
    toks = tokenise_pairs(pairs, tok, tokenizer.eos_token_id, c["max_prompt_tokens"],
                          c["max_answer_tokens"])
    pad = pad_id(tokenizer)
    rc, rr = implicit_rewards(peft_model, info, toks, pad, progress=True)
    group = np.unique([p.prompt_id for p in toks], return_inverse=True)[1]
    acc = pair_accuracy(group, rc, rr, n_boot, seed)
    return {"adapter": str(folder), "method": info["method"], "task": task, "split": split,
            "n_pairs": len(toks), "accuracy": acc, "margin_mean": float(np.mean(rc - rr))}
