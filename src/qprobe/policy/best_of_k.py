"""Best-of-k with a Q-probe: sample k completions, score each with the probe, return the choice.

    from qprobe.backends import load_model
    from qprobe.policy import QProbePolicy
    from qprobe.probe import Probe

    probe = Probe.load("probes/demo")
    policy = QProbePolicy(load_model("default", layer=probe.feature_spec.layer), probe, k=8)
    out = policy.generate(["What is 7 + 5?"])[0]
    out.text, out.scores, out.chosen

Features come from the sampling model itself when it computes them (local backends), or from an
`Embedder` given separately (API models: completions from the server, features from a local
model). Either way the probe refuses features of another spec (FeatureSpecMismatch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.policy.base import Answer, Policy, model_sample
from qprobe.policy.select import choose, softmax_weights

if TYPE_CHECKING:  # the backends are imported only when a policy is built
    from qprobe.backends.base import Embedder, LanguageModel, SamplingParams


@dataclass
class Choice:
    """The result for one prompt: the chosen completion and every candidate with its score."""

    prompt: str
    text: str  # the chosen completion
    chosen: int  # its index among the candidates
    candidates: list[str]
    scores: list[float]  # probe score Q of each candidate
    weights: list[float]  # selection probability softmax(Q / beta) of each candidate
    finish_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "text": self.text,
            "candidates": [
                {"index": i, "text": t, "score": s, "weight": w, "finish_reason": f}
                for i, (t, s, w, f) in enumerate(
                    zip(self.candidates, self.scores, self.weights, self.finish_reasons)
                )
            ],
        }


class QProbePolicy:
    """Best-of-k with a probe: pi(a | x) = softmax(Q(x, a_1..k) / beta) over k base samples.

    model: the sampling backend. probe: a loaded `qprobe.probe.Probe`. beta: None = the probe's
    own beta; 0 = argmax. embedder: computes features when the model gives none (API models).
    seed: seeds both the sampling (via `params.seed` when `params` is None) and the choice.
    include_greedy: candidate 0 is the greedy completion, the other k-1 are samples. The choice
    is then no longer among i.i.d. draws from p0, so the KL-regularised limit of the paper's
    theorem 4.1 does not apply (see docs/objectives.md); it is a practical floor: with a probe
    that ranks well, the policy does at least about as well as greedy decoding.
    visible: f(prompts, completions) -> 1 / 0 / None per candidate, whether it passes the tests
    its prompt shows (a code task's `visible_reward`); needed by a probe with the visible_pass
    input.
    """

    def __init__(
        self,
        model: LanguageModel,
        probe: Any,
        k: int = 8,
        beta: float | None = None,
        params: SamplingParams | None = None,
        embedder: Embedder | None = None,
        seed: int = 0,
        include_greedy: bool = False,
        visible: Callable[[list[str], list[str]], list[float | None]] | None = None,
    ) -> None:
        if "visible_pass" in probe.extras and visible is None:
            raise QProbeError("generate: this probe reads visible_pass; pass visible= (e.g. a code "
                              "task's visible_reward, which runs the prompt's shown tests in the "
                              "sandbox)")
        self.visible = visible
        from qprobe.probe import REVIEWER_EXTRAS

        reviewed = sorted(set(probe.extras) & set(REVIEWER_EXTRAS))
        if reviewed:  # `qprobe review` scores stored rollouts, not fresh samples
            raise QProbeError(f"generate: this probe reads {reviewed} (the reviewer likelihood of "
                              "`qprobe review`), computed for stored rollouts only; use a probe "
                              "without it")
        if k < 1 + int(include_greedy):
            raise QProbeError(f"generate: k must be >= {1 + int(include_greedy)}, got {k}")
        self.include_greedy = bool(include_greedy)
        self.model, self.probe, self.k = model, probe, int(k)
        self.beta = float(probe.beta if beta is None else beta)
        if params is None:
            from qprobe.backends.base import SamplingParams

            params = SamplingParams(seed=seed)
        self.params = params
        self.embedder = embedder
        self.rng = np.random.default_rng(seed)
        spec = model.feature_spec if embedder is None else embedder.feature_spec
        if probe.feature_dim == 0:  # a probe on log-likelihoods alone reads no hidden state
            return
        if spec is None:
            raise QProbeError(
                f"generate: model {model.name!r} gives no features; "
                "pass an embedder (--embedder) that computes the probe's features"
            )
        probe.check_features(spec, where=f"model {model.name!r} vs probe")

    def generate(self, prompts: list[str]) -> list[Choice]:
        """One `Choice` per prompt (k samples each, scored in one batch)."""
        return self.select(list(prompts), self._candidates(list(prompts)))

    def select(self, prompts: list[str], samples: list[list[Any]],
               rngs: list[np.random.Generator] | None = None) -> list[Choice]:
        """Score given candidates (samples[i]: the k samples of prompts[i]) and choose one per
        prompt. rngs: one generator per prompt for the choice (default: the policy's own), so a
        caller that batches unrelated prompts (the server) chooses as separate calls would."""
        if rngs is not None and len(rngs) != len(prompts):
            raise QProbeError(f"select: {len(prompts)} prompts but {len(rngs)} generators")
        flat = [s for group in samples for s in group]
        feats = self._features(prompts, samples, flat) if self.probe.feature_dim else None
        cols: dict[str, np.ndarray] | None = None
        if self.probe.extras:
            from qprobe.probe import LOGLIK_EXTRAS, loglik_of

            cols = {}
            if set(self.probe.extras) & set(LOGLIK_EXTRAS):
                cols = loglik_of(flat)
                if cols is None:
                    raise QProbeError("generate: this probe reads log-likelihoods, which the model "
                                      f"{self.model.name!r} did not return")
            if "visible_pass" in self.probe.extras:
                flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
                vis = self.visible(flat_prompts, [s.text for s in flat])  # type: ignore[misc]
                cols["visible_pass"] = np.array([0.5 if v is None else float(v) for v in vis])
        scores = self.probe.score(self.probe.inputs(feats, cols)).astype(np.float64)  # [P*k]
        out, i = [], 0
        for n, (prompt, group) in enumerate(zip(prompts, samples)):
            q = scores[i : i + len(group)]  # [k]
            i += len(group)
            j = choose(q, self.beta, self.rng if rngs is None else rngs[n])
            out.append(
                Choice(
                    prompt=prompt,
                    text=group[j].text,
                    chosen=j,
                    candidates=[s.text for s in group],
                    scores=[float(x) for x in q],
                    weights=[float(x) for x in softmax_weights(q, self.beta)],
                    finish_reasons=[s.finish_reason for s in group],
                )
            )
        return out

    def _candidates(self, prompts: list[str]) -> list[list[Any]]:
        """k i.i.d. samples per prompt, or the greedy completion and k-1 samples."""
        if not self.include_greedy:
            return self.model.sample(prompts, self.k, self.params)
        import dataclasses

        greedy = self.model.sample(prompts, 1, dataclasses.replace(self.params, temperature=0.0))
        rest = self.model.sample(prompts, self.k - 1, self.params)
        return [g + r for g, r in zip(greedy, rest)]

    def _features(self, prompts: list[str], samples: list[list[Any]], flat: list[Any]
                  ) -> np.ndarray:
        if self.embedder is not None:
            reps = [p for p, g in zip(prompts, samples) for _ in g]
            return self.embedder.embed(reps, [s.text for s in flat])  # [P*k, D]
        if any(s.feature is None for s in flat):
            raise QProbeError("generate: the model returned samples without features")
        return np.stack([s.feature for s in flat])  # [P*k, D]


def best_of_k(
    model: LanguageModel,
    probe: Any,
    prompt: str,
    k: int = 8,
    beta: float | None = None,
    params: SamplingParams | None = None,
    embedder: Embedder | None = None,
    seed: int = 0,
    include_greedy: bool = False,
    visible: Callable[[list[str], list[str]], list[float | None]] | None = None,
) -> Choice:
    """The probe's choice among k samples for one prompt (see `QProbePolicy`)."""
    return QProbePolicy(model, probe, k, beta, params, embedder, seed,
                        include_greedy, visible).generate([prompt])[0]


class BestOfKPolicy(Policy):
    """The `best-of-k` kind of the policy registry: `QProbePolicy` behind the policy contract."""

    kind = "best-of-k"
    needs = ("probe",)

    def __init__(self, cfg: Any, model: LanguageModel, scorer: QProbePolicy) -> None:
        super().__init__(cfg, model)
        self.scorer = scorer

    @classmethod
    def build(cls, cfg: Any, ctx: Any) -> Policy:
        from qprobe.probe import REVIEWER_EXTRAS, Probe

        if not cfg.probe:
            raise QProbeError("policy best-of-k: give probe=PROBE_DIR")
        probe = Probe.load(cfg.probe)
        if set(probe.extras) & set(REVIEWER_EXTRAS):
            raise QProbeError(f"policy best-of-k: {cfg.probe} reads the reviewer likelihood "
                              "(`qprobe review`), computed for stored rollouts only: use a probe "
                              "without it")
        if "visible_pass" in probe.extras and ctx.visible is None:
            raise QProbeError(f"policy best-of-k: {cfg.probe} reads visible_pass (the prompt's "
                              "shown tests, run in the sandbox); give a code task (--task), or "
                              "use a probe without it (a server does not run code)")
        spec = probe.feature_spec
        if spec is None and probe.feature_dim:
            raise QProbeError(f"{cfg.probe}: probe has no feature spec; cannot pick a model layer")
        model = ctx.model(feature_spec=spec if probe.feature_dim else None)
        scorer = QProbePolicy(model, probe, k=max(cfg.k, 1 + int(cfg.include_greedy)),
                              beta=cfg.beta, embedder=ctx.embedder, visible=ctx.visible,
                              include_greedy=cfg.include_greedy)
        return cls(cfg, model, scorer)

    @property
    def probe(self) -> Any:
        return self.scorer.probe

    @property
    def beta(self) -> float:
        return float(self.probe.beta if self.cfg.beta is None else self.cfg.beta)

    plain_samples = True

    @property
    def continuous(self) -> bool:
        return super().continuous and not self.cfg.include_greedy

    def draws(self, n: int) -> int:
        return max(int(self.cfg.k), int(n))

    @property
    def sampler_id(self) -> str:
        return "model+greedy" if self.cfg.include_greedy else "model"

    def sample(self, prompts, k, params, *, hook: Any = None, observe: Any = None):
        if not self.cfg.include_greedy:  # the model's plain samples, as `sample` policies draw
            return model_sample(self.model, prompts, k, params, hook, observe)
        import dataclasses

        greedy = model_sample(self.model, prompts, 1, dataclasses.replace(params, temperature=0.0))
        rest = model_sample(self.model, prompts, k - 1, params)
        return [g + r for g, r in zip(greedy, rest)]

    def choose(self, prompts, samples, rngs) -> list[Answer]:
        import copy

        scorer = copy.copy(self.scorer)
        scorer.beta = self.beta
        out = []
        for p, group, c in zip(prompts, samples, scorer.select(prompts, samples, rngs=rngs)):
            out.append(Answer(p, c.chosen, list(group), c.scores, c.weights))
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}
