"""The policy contract: how a model's samples become the answer to a prompt.

A `Policy` answers a list of prompts under sampling params. It does so in two parts, so that a
server can decode many requests' prompts in one batch and still answer each by its own policy:

- `sample(prompts, k, params)`: the candidates, k per prompt (`draws(n)` says how many it needs
  to return n answers): plain samples of the model, guided samples, an adapter's samples;
- `choose(prompts, samples, rngs)`: one `Answer` per prompt: which candidate is the answer and,
  for a policy that scores them, every candidate's score and selection weight.

`generate` is the two together. Class attributes say what the server and the commands may count
on: `per_token`, the policy decides each token as it samples it (so its answer can be streamed
as it is decoded: `sample` takes an `observe` callback, see `backends.hf.loop.StepObserver`);
`needs`, what it reads besides the model ("probe", "head", "adapter"); `sampler_id`, policies with
the same id sample the same way, so their requests may share one decode batch.

One kind per module, registered by key in `policy/registry.py`; its config is a dataclass in
`policy/specs.py`. See docs/architecture.md, "a new policy".
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from qprobe.backends.base import LanguageModel, Sample, SamplingParams
    from qprobe.policy.loading import ModelContext


@dataclass
class Answer:
    """A policy's answer to one prompt: its candidates and which one it chose."""

    prompt: str
    chosen: int
    samples: list[Sample]  # every candidate drawn (all count as compute)
    scores: list[float] | None = None  # what the policy ranked the candidates by, if anything
    weights: list[float] | None = None  # selection probability of each candidate

    @property
    def text(self) -> str:
        return self.samples[self.chosen].text

    def order(self) -> list[int]:
        """Candidates in the order they are returned: the choice first, then by descending
        score (index order when the policy scores nothing)."""
        rest = [j for j in range(len(self.samples)) if j != self.chosen]
        if self.scores is not None:
            rest.sort(key=lambda j: (-self.scores[j], j))
        return [self.chosen, *rest]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "text": self.text,
                "candidates": [{"index": j, "text": s.text, "finish_reason": s.finish_reason,
                                **({} if self.scores is None else {"score": self.scores[j]}),
                                **({} if self.weights is None else {"weight": self.weights[j]})}
                               for j, s in enumerate(self.samples)]}


class Policy(ABC):
    """One kind of policy over a loaded model; `cfg` is its spec dataclass (`policy/specs.py`)."""

    kind: ClassVar[str] = ""
    per_token: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, model: LanguageModel) -> None:
        self.cfg, self.model = cfg, model

    @classmethod
    @abstractmethod
    def build(cls, cfg: Any, ctx: ModelContext) -> Policy:
        """The policy for config `cfg`, loading what it needs through `ctx` (which shares one
        model among the policies of a server)."""

    def with_config(self, cfg: Any) -> Policy:
        """The same policy (same model, probe, head...) with another config of its kind (a
        request's options)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.cfg = cfg
        return new

    # -- what the batcher reads

    @property
    def sampler_id(self) -> str:
        """Policies with equal ids sample identically given (prompts, k, params)."""
        return "model"

    plain_samples = False  # `sample` is the model's plain sampling (no hook of its own)

    @property
    def continuous(self) -> bool:
        """Whether a server may decode this policy's requests in an open decode that requests
        join at any step (`HFLanguageModel.decode_continuous`): plain sampling of a local
        Llama-family model; not a policy running its own step hook, nor an upstream model."""
        return self.plain_samples and bool(getattr(getattr(self, "model", None), "continuous",
                                                   False))

    @property
    def streams(self) -> bool:
        """Whether `sample` can report tokens as they are decided (`observe=`): a per-token
        policy on a local model."""
        return self.per_token and takes(self.model, "observe")

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Token ids -> text, as the model's sampler decodes them (streaming)."""
        return self.model.tok.decode(ids)

    def draws(self, n: int) -> int:
        """Candidates per prompt needed to return n answers (a per-token policy: n)."""
        return int(n)

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """The params the policy samples with (greedy: temperature 0)."""
        return params

    @abstractmethod
    def sample(self, prompts: list[str], k: int, params: SamplingParams, *, hook: Any = None,
               observe: Any = None) -> list[list[Sample]]:
        """k candidates per prompt: result[i][j] is candidate j of prompts[i]."""

    def choose(self, prompts: list[str], samples: list[list[Sample]],
               rngs: list[np.random.Generator]) -> list[Answer]:
        """One answer per prompt; rngs: one generator per prompt for a random choice. Default:
        the first candidate (a per-token policy's sample is its answer)."""
        return [Answer(p, 0, list(g)) for p, g in zip(prompts, samples)]

    def generate(self, prompts: list[str], params: SamplingParams, *, seed: int = 0,
                 n: int = 1) -> list[Answer]:
        """Sample and choose. params.seed seeds the samples, `seed` the choice."""
        import numpy as np

        params = self.sampling(params)
        samples = self.sample(list(prompts), self.draws(n), params)
        rng = np.random.default_rng(seed)
        return self.choose(list(prompts), samples, [rng] * len(prompts))

    def describe(self) -> dict[str, Any]:
        """The kind and its settings, for responses and reports."""
        return {"kind": self.kind, **dataclasses.asdict(self.cfg)}


def model_sample(model: LanguageModel, prompts: list[str], k: int, params: SamplingParams,
                 hook: Any = None, observe: Any = None) -> list[list[Sample]]:
    """`model.sample`, passing the hook and observer only when given (an upstream model's
    `sample` takes neither)."""
    kw = {}
    if hook is not None:
        kw["hook"] = hook
    if observe is not None:
        kw["observe"] = observe
    return model.sample(prompts, k, params, **kw)


def takes(model: Any, name: str) -> bool:
    """Whether `model.sample` takes keyword `name` (the local backend's takes hook and observe)."""
    import inspect

    try:
        return name in inspect.signature(model.sample).parameters
    except (AttributeError, TypeError, ValueError):
        return False
