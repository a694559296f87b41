"""The `guided` kind of the policy registry: token-level reward-guided decoding (`GuidedSampler`,
RAD or ARM head) behind the policy contract. Each guided sample is an answer; the policy decides
every token as it samples it, so a server can stream it."""

from __future__ import annotations

import copy
from typing import Any

from qprobe.errors import QProbeError
from qprobe.policy.base import Policy


class GuidedPolicy(Policy):
    kind = "guided"
    per_token = True
    needs = ("head",)

    def __init__(self, cfg: Any, model: Any, sampler: Any) -> None:
        super().__init__(cfg, model)
        self.sampler = sampler

    @classmethod
    def build(cls, cfg: Any, ctx: Any) -> Policy:
        from qprobe.policy.guided import GuidedSampler
        from qprobe.policy.heads import RewardHead

        if not cfg.head:
            raise QProbeError("policy guided: give head=HEAD_DIR")
        head = RewardHead.load(cfg.head)
        spec = head.feature_spec
        if spec is None:
            raise QProbeError(f"{cfg.head}: the head has no feature spec")
        # At the head's block, an ARM head on this model reads the loop's own state (no extra
        # pass); a model already loaded for other policies runs as the head's trunk if needed.
        model = ctx.model(layer=spec.layer, chat=spec.model.endswith("+chat"), local=True,
                          what="guided decoding runs inside the local decode loop")
        trunk = None
        if spec.model != model._spec.model:  # a head on another model's states: load that one
            name = cfg.reward_model or head.trunk
            if not name:
                raise QProbeError(f"{cfg.head}: reads {spec.model!r}; give reward_model=")
            from qprobe.backends.hf import load_hf

            trunk = load_hf(name, device=ctx.device)
        sampler = GuidedSampler(model, head, cls._guide(cfg), trunk)
        return cls(cfg, model, sampler)

    @staticmethod
    def _guide(cfg: Any):
        from qprobe.policy.guided import GuideConfig

        return GuideConfig(beta=cfg.beta, top_k=cfg.top_k, inverse=cfg.inverse,
                           clamp_min=cfg.clamp_min, clamp_max=cfg.clamp_max)

    def with_config(self, cfg: Any) -> Policy:
        new = super().with_config(cfg)
        new.sampler = copy.copy(self.sampler)  # shares the model, head and trunk
        new.sampler.cfg = self._guide(cfg)
        return new

    @property
    def sampler_id(self) -> str:
        c = self.cfg
        return f"guided:{id(self.sampler.head)}:{c.beta}:{c.top_k}:{c.inverse}"

    @property
    def streams(self) -> bool:
        return True

    def sample(self, prompts, k, params, *, hook: Any = None, observe: Any = None):
        if hook is not None:
            raise QProbeError("policy guided: runs its own step hook; no other can join it")
        return self.sampler.sample(prompts, k, params, observe=observe)

    def describe(self) -> dict[str, Any]:
        """The settings, the guidance method (rad / arm, own state or trunk) and its cost so
        far (reward-model token-forwards per decoded token)."""
        return {**super().describe(), "method": self.sampler.method, **self.sampler.cost()}
