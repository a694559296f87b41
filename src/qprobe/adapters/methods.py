"""The adapter method registry: what a preference method that fine-tunes a LoRA must provide.

One entry per method (`METHODS`), naming the class that implements `AdapterMethod` by a
"module:Class" string, imported only when used (this module is torch-free: `qprobe adapt
--help` reads the method names from it). A new method is one class and one entry here;
`qprobe adapt`, sampling from an adapter (`adapters/policy.py`, the "adapter" backend key and the
served `qadapter` / `dpo` policies), its implicit reward (`adapt-eval`) and its perplexity on
general text (`adapt-eval --text`) all ask the registry, never compare method strings.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qprobe.errors import QProbeError

if TYPE_CHECKING:
    import torch

    from qprobe.adapters.config import AdaptConfig


class AdapterMethod(ABC):
    """How one preference method trains, samples and scores (see the module docstring)."""

    key: str = ""

    @abstractmethod
    def train(self, cfg: AdaptConfig, bundle: tuple | None = None, say=print) -> dict[str, Any]:
        """Train (or resume) into cfg.out; returns the adapter.json contents."""

    @abstractmethod
    def language_model(self, peft_model, base, tokenizer, info: dict[str, Any], *, name: str,
                       **kw: Any):
        """The `HFLanguageModel` whose decode loop samples this adapter's policy (with
        `decode_hook`). peft_model: the adapter on a copy of `base`, the frozen base model;
        name: the adapter policy's identity; kw: layer, position, features, feature_dtype,
        max_batch_rows."""

    def decode_hook(self, peft_model, prompt_ids: list[list[int]], k: int,
                    info: dict[str, Any], pad_id: int):
        """The decode loop's `StepHook` that turns the model's logits into the policy's, or None
        when `language_model` already samples the policy."""
        return None

    @abstractmethod
    def implicit_reward(self, peft_model, info: dict[str, Any],
                        batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequence rewards [rows] of a tokenised batch (`data.batch_tensors`)."""

    @abstractmethod
    def policy_logp(self, adapter_logits: torch.Tensor, base_logp: torch.Tensor,
                    info: dict[str, Any]) -> torch.Tensor:
        """The policy's next-token log-probabilities [N, V] from the model's logits with the
        adapter on [N, V] and the base model's log-probabilities [N, V]."""


@dataclass(frozen=True)
class MethodEntry:
    key: str
    target: str  # "module:Class"
    help: str


METHODS: dict[str, MethodEntry] = {
    "qadapter": MethodEntry("qadapter", "qprobe.adapters.qadapter_method:QAdapterMethod",
                            "Q-Adapter: the adapter's logits are a residual Q-function"),
    "dpo": MethodEntry("dpo", "qprobe.adapters.dpo:DPOMethod", "DPO with TRL's DPOTrainer"),
}


def method(key: str) -> AdapterMethod:
    """The implementation of method `key` (QProbeError for an unknown one)."""
    entry = METHODS.get(key)
    if entry is None:
        raise QProbeError(f"adapter: unknown method {key!r}; known: {', '.join(METHODS)}")
    mod, _, cls = entry.target.partition(":")
    return getattr(importlib.import_module(mod), cls)()
