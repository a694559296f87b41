"""The feature spec: which vector phi(x, a) a probe was trained on.

A probe is only meaningful on features of the same model, layer, token position and dimension.
The spec travels with every rollout folder (`meta.json`) and every probe (`config.json`), and
`check_compatible` refuses a mismatch with a clear message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qprobe.errors import FeatureSpecMismatch, QProbeError

POSITIONS = ("last", "mean")
DTYPES = ("float16", "float32")


def chat_identity(identity: str, chat: bool) -> str:
    """The model a feature is read from: the backend's identity, plus "+chat" when prompts went
    through the chat template (it changes the context the feature is read in)."""
    return identity + ("+chat" if chat else "")


@dataclass(frozen=True)
class FeatureSpec:
    """Identity of a feature vector.

    model: model identity (hub id, path or file name; whatever the backend reports).
    layer: residual stream after this decoder block (0-based, counted as the backend resolved it;
           -1 would mean the last block but specs always store the resolved non-negative index).
    position: "last" = last kept completion token, "mean" = mean over completion tokens.
    dim: feature dimension (the model's hidden size).
    dtype: storage dtype of the features ("float16" default, or "float32").
    """

    model: str
    layer: int
    position: str = "last"
    dim: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise QProbeError(f"feature spec: position must be one of {POSITIONS}, got {self.position!r}")
        if self.dtype not in DTYPES:
            raise QProbeError(f"feature spec: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if int(self.dim) <= 0:
            raise QProbeError(f"feature spec: dim must be positive, got {self.dim!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "feature spec") -> FeatureSpec:
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("model", "layer", "dim") if n not in d]
        if missing:
            raise QProbeError(f"{where}: missing key(s) {missing}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:  # pragma: no cover - defensive
            raise QProbeError(f"{where}: {e}") from None

    def same_features(self, other: FeatureSpec) -> bool:
        """True when two specs describe the same vector (storage dtype may differ)."""
        return (self.model, int(self.layer), self.position, int(self.dim)) == (
            other.model,
            int(other.layer),
            other.position,
            int(other.dim),
        )

    def check_compatible(self, other: FeatureSpec, where: str = "") -> None:
        """Raise FeatureSpecMismatch unless `other` describes the same features as `self`."""
        if self.same_features(other):
            return
        diffs = [
            f"{k}: expected {getattr(self, k)!r}, got {getattr(other, k)!r}"
            for k in ("model", "layer", "position", "dim")
            if getattr(self, k) != getattr(other, k)
        ]
        prefix = f"{where}: " if where else ""
        raise FeatureSpecMismatch(prefix + "features of a different spec (" + "; ".join(diffs) + ")")
