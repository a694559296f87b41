"""The backend contract: sample k completions per prompt, each with its Q-probe feature.

Every backend (local transformers model, OpenAI-compatible server) implements `LanguageModel`;
anything that turns (prompt, completion) text into features implements `Embedder`. The rest of
qprobe (collect, evaluate, generate) only talks to these two interfaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qprobe import defaults
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec

if TYPE_CHECKING:  # annotations only: the CLI's parser imports this module and not numpy
    import numpy as np


@dataclass
class SamplingParams:
    """How to sample completions (the paper's code experiments: temperature 0.8, top-p 0.95)."""

    temperature: float = field(
        default=defaults.TEMPERATURE,
        metadata={"help": "Softmax temperature; 0 means greedy (argmax) decoding."},
    )
    top_p: float = field(
        default=defaults.TOP_P,
        metadata={"help": "Nucleus sampling: keep the smallest top set with this mass."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Keep only the k most likely next tokens before top-p (0: no top-k)."},
    )
    max_new_tokens: int = field(
        default=defaults.MAX_NEW_TOKENS,
        metadata={"help": "Upper bound on generated tokens per completion."},
    )
    stop: list[str] = field(
        default_factory=list,
        metadata={"help": "Stop strings: the completion is cut before the first occurrence."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Base seed; each (prompt, sample) draws from its own derived stream."},
    )
    ignore_eos: bool = field(
        default=False,
        metadata={"help": "Decode past end-of-sequence tokens, so every completion runs to "
                          "max_new_tokens or a stop string (vLLM's ignore_eos; for benchmarks)."},
    )

    def __post_init__(self) -> None:
        if not (self.temperature >= 0):
            raise QProbeError(f"sampling: temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise QProbeError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            raise QProbeError(f"sampling: top_k must be >= 0 (0: off), got {self.top_k}")
        if int(self.max_new_tokens) < 1:
            raise QProbeError(f"sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise QProbeError(f"sampling: stop strings must be non-empty strings, got {self.stop!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["top_k"]:  # off: left out, so rollouts made before top-k existed still resume
            d.pop("top_k")
        if not d["ignore_eos"]:  # likewise
            d.pop("ignore_eos")
        return d


@dataclass
class Sample:
    """One completion.

    text: the completion, cut before the first stop string (EOS never included).
    token_ids: the completion tokens fully contained in `text` (a token straddling the stop
               string is dropped; the feature belongs to the last token kept here).
               Empty when the backend does not know them (an API returns text).
    finish_reason: "stop" (EOS or stop string) or "length" (max_new_tokens reached).
    feature: the Q-probe feature [dim] (backend's FeatureSpec), or None if not computed.
    logprob_sum: sum of the completion tokens' log-probabilities under the model's own
                 distribution (temperature 1, no top-p truncation), over exactly the tokens of
                 `text` (EOS and what the stop-string cut removed are not counted); None when
                 the backend cannot tell.
    num_tokens: how many tokens `logprob_sum` and `text` hold (len(token_ids) when token_ids are
                given; an API may know the count without the ids); None when unknown.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    feature: np.ndarray | None = None
    logprob_sum: float | None = None
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_tokens is None and self.token_ids:
            self.num_tokens = len(self.token_ids)


class LanguageModel(ABC):
    """A model that samples k completions per prompt, with features when it can.

    Besides `feature_spec` and `sample`, callers read these attributes (every backend sets them,
    as plain attributes or properties):
      name            the model's identity, recorded in rollout meta;
      chat            whether prompts are sent as chat messages (a chat template, a chat endpoint);
      max_batch_rows  rows (prompts x k) worth giving one `sample` call: `collect` batches and
                      writes shards by it.
    """

    name: str = ""
    chat: bool = False
    max_batch_rows: int = 128

    @property
    @abstractmethod
    def feature_spec(self) -> FeatureSpec | None:
        """What `Sample.feature` is (None when the backend produces no features)."""

    @abstractmethod
    def sample(self, prompts: list[str], k: int, params: SamplingParams) -> list[list[Sample]]:
        """Draw k completions for each prompt: result[i][j] is sample j of prompt i.

        Local backends seed each (prompt text, sample index, params.seed) separately, so a
        sample does not depend on which other prompts share its batch.
        """


class Embedder(ABC):
    """Computes features phi(x, a) for given (prompt, completion) pairs."""

    @property
    @abstractmethod
    def feature_spec(self) -> FeatureSpec:
        """What the returned rows are."""

    @abstractmethod
    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Features of each (prompt, completion) pair: float32 [N, dim]."""
