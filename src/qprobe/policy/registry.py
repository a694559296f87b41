"""The policy registry: one entry per kind, its spec dataclass and the class implementing it.

Entries name their class by a "module:Class" string, imported when a policy of that kind is built
(so this module stays torch-free for the commands' parsers, and the adapters' kinds, which live
on a higher floor, are reached by key as `backends.registry` reaches the adapter backend).

    policy = build("guided:head=runs/head,beta=5", ModelContext("default"))
    answers = policy.generate(["Write a review:"], SamplingParams(max_new_tokens=64, seed=0))

A new policy: a `Policy` subclass in its own module, a spec dataclass in `policy/specs.py`, one
entry here (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qprobe.policy import specs
from qprobe.policy.specs import SpecError

if TYPE_CHECKING:
    from qprobe.policy.base import Policy
    from qprobe.policy.loading import ModelContext


@dataclass(frozen=True)
class PolicyKind:
    key: str
    spec: type  # its config dataclass (policy/specs.py)
    target: str  # "module:Class" implementing `policy.base.Policy`
    help: str

    def load(self) -> type:
        mod, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(mod), cls)


POLICIES: dict[str, PolicyKind] = {k.key: k for k in (
    PolicyKind("sample", specs.SampleSpec, "qprobe.policy.plain:SamplePolicy",
               "one sample of the model is the answer"),
    PolicyKind("greedy", specs.GreedySpec, "qprobe.policy.plain:GreedyPolicy",
               "greedy decoding"),
    PolicyKind("best-of-k", specs.BestOfKSpec, "qprobe.policy.best_of_k:BestOfKPolicy",
               "k samples, the probe's choice softmax(Q/beta)"),
    PolicyKind("logprob", specs.LogprobSpec, "qprobe.policy.logprob:LogprobPolicy",
               "k samples, the highest mean or sum log-probability"),
    PolicyKind("guided", specs.GuidedSpec, "qprobe.policy.guided_policy:GuidedPolicy",
               "token-level reward-guided decoding with a RAD or ARM head"),
    PolicyKind("qadapter", specs.AdapterSpec, "qprobe.adapters.policy:AdapterPolicy",
               "sampling from a Q-Adapter's policy"),
    PolicyKind("dpo", specs.AdapterSpec, "qprobe.adapters.policy:AdapterPolicy",
               "sampling from a DPO adapter (merged LoRA)"),
)}


def read(spec: str) -> tuple[PolicyKind, Any]:
    """(kind, config) of a spec string, checked (SpecError when it cannot be read)."""
    key, opts = specs.parse(spec)
    kind = POLICIES.get(key)
    if kind is None:
        raise SpecError(f"policy spec {spec!r}: unknown kind {key!r}; known: "
                        f"{', '.join(POLICIES)}")
    return kind, specs.config(kind.spec, opts, spec)


def build(spec: str, ctx: ModelContext) -> Policy:
    """The policy a spec names, over the model (and embedder) of `ctx`."""
    kind, cfg = read(spec)
    ctx.kind = kind.key
    return kind.load().build(cfg, ctx)


def build_config(key: str, cfg: Any, ctx: ModelContext) -> Policy:
    """The policy of kind `key` for an already made config (a command's short form)."""
    ctx.kind = key
    return POLICIES[key].load().build(cfg, ctx)


def request_options(policy: Policy, spec: str) -> Any:
    """A served client's spec applied to `policy`'s config: 'opt=value,...' or 'KIND:opt=...'
    with the policy's own kind; only the options marked `request` (SpecError otherwise)."""
    if not isinstance(spec, str):
        raise SpecError("policy spec: must be a string like 'beta=2,top_k=10'")
    head = spec.split("=", 1)[0]
    key, opts = specs.parse(spec if ":" in head or "=" not in spec else f"{policy.kind}:{spec}")
    if key != policy.kind:
        raise SpecError(f"policy spec {spec!r}: this model serves a {policy.kind!r} policy, "
                        f"not {key!r}")
    return specs.config(type(policy.cfg), opts, spec, base=policy.cfg, request=True)


def help_text() -> str:
    """The kinds and their options, for --help."""
    return " | ".join(f"{k.key}: {k.help} ({specs.describe(k.spec)})" for k in POLICIES.values())
