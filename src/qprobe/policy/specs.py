"""Policy specs: `KIND[:key=value,key=value...]`, one config dataclass per kind (torch-free).

    best-of-k:probe=runs/probe-pg,k=16,beta=0     k samples, the probe's softmax(Q/beta) choice
    logprob:reduce=mean,k=8                       k samples, the highest mean (or sum) log-prob
    sample / greedy                               the model's own sample / greedy decoding
    guided:head=runs/head-arm,beta=5,top_k=20     token-level reward-guided decoding (ARM / RAD)
    qadapter:adapter=runs/qa / dpo:adapter=...    sampling from a preference adapter's policy

The configs are read by `qprobe generate --policy`, `qprobe serve --policy NAME=SPEC`, and the
`policies:` of a `qprobe run` YAML. A field marked `request` may also be set per request by a
served client (numbers and switches only: files are the server's to choose); `min` / `max`
bound it. `registry.POLICIES` maps each kind to its config here and its implementation.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from qprobe.errors import QProbeError


class SpecError(QProbeError):
    """A policy spec that cannot be read (unknown kind or option, bad value)."""


@dataclass
class SampleSpec:
    """The model's own samples: each answer is one sample (no scoring, no choice)."""


@dataclass
class GreedySpec:
    """Greedy decoding (temperature 0) of the model."""


@dataclass
class BestOfKSpec:
    """Best of k with a Q-probe: k samples, scored by the probe, chosen by softmax(Q/beta)."""

    probe: str = field(default="", metadata={"help": "trained probe folder", "path": True})
    k: int = field(default=8, metadata={"help": "candidates per prompt", "request": True,
                                        "min": 1})
    beta: float | None = field(default=None, metadata={
        "help": "selection temperature, 0 = argmax (default: the probe's)", "request": True,
        "min": 0.0})
    include_greedy: bool = field(default=False, metadata={
        "help": "candidate 0 is the greedy completion, the other k-1 samples"})


@dataclass
class LogprobSpec:
    """Best of k by the model's own log-likelihood: the candidate with the highest mean
    (per token) or sum of log-probabilities."""

    reduce: str = field(default="mean", metadata={"help": "mean or sum", "request": True,
                                                  "choices": ("mean", "sum")})
    k: int = field(default=8, metadata={"help": "candidates per prompt", "request": True,
                                        "min": 1})


@dataclass
class GuidedSpec:
    """Token-level reward-guided decoding with a RAD or ARM head (docs/guided.md)."""

    head: str = field(default="", metadata={"help": "reward head folder (qprobe train-head)",
                                            "path": True})
    beta: float = field(default=1.0, metadata={"help": "reward weight: logits + beta * r",
                                               "request": True, "min": 0.0})
    top_k: int = field(default=20, metadata={"help": "next-token candidates scored per step",
                                             "request": True, "min": 1, "max": 1000})
    inverse: bool = field(default=False, metadata={"help": "steer away from the reward (1 - r)",
                                                   "request": True})
    clamp_min: float | None = field(default=None, metadata={
        "help": "rewards clamped to at least this (default: 0; none for a pairs head)"})
    clamp_max: float | None = field(default=None, metadata={
        "help": "rewards clamped to at most this (default: 1; none for a pairs head)"})
    reward_model: str | None = field(default=None, metadata={
        "help": "the model a head on another model's states reads (default: the head's)",
        "path": True})


@dataclass
class AdapterSpec:
    """Sampling from a preference adapter's policy (`qprobe adapt`; the folder's method must be
    the kind's)."""

    adapter: str = field(default="", metadata={"help": "adapter folder", "path": True})


def parse(spec: str) -> tuple[str, dict[str, str]]:
    """'KIND:key=value,key=value' -> (KIND, {key: value}); 'KIND' -> (KIND, {})."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("policy spec: empty (expected KIND[:key=value,...])")
    kind, _, rest = spec.strip().partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise SpecError(f"policy spec {spec!r}: {part!r} is not key=value")
        if key in opts:
            raise SpecError(f"policy spec {spec!r}: {key!r} given twice")
        opts[key] = value.strip()
    return kind.strip(), opts


def _value(spec: str, name: str, raw: str, hint: Any, meta: Any) -> Any:
    args = set(typing.get_args(hint)) or {hint}
    if raw.lower() in ("none", "") and type(None) in args:
        return None
    args.discard(type(None))
    (typ,) = args
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            v: Any = raw.lower() in ("true", "1", "yes")
        elif typ is int:
            v = int(raw)
        elif typ is float:
            v = float(raw)
            if not math.isfinite(v):
                raise ValueError
        else:
            v = raw
    except ValueError:
        raise SpecError(f"policy spec {spec!r}: {name}={raw!r} is not a valid "
                        f"{getattr(typ, '__name__', typ)}") from None
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SpecError(f"policy spec {spec!r}: {name} must be in "
                        f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {v}")
    if choices and v not in choices:
        raise SpecError(f"policy spec {spec!r}: {name} must be one of {choices}, got {v!r}")
    return v


def config(cls: type, opts: dict[str, str], spec: str, base: Any = None,
           request: bool = False) -> Any:
    """The config `cls` with `opts` applied on `base` (default: cls()). request: only the fields
    marked `request` may be set (a served client's spec)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, raw in opts.items():
        f = fields.get(name)
        if f is None:
            known = ", ".join(fields) or "none"
            raise SpecError(f"policy spec {spec!r}: unknown option {name!r} (options: {known})")
        if request and not f.metadata.get("request"):
            settable = ", ".join(n for n, g in fields.items() if g.metadata.get("request"))
            raise SpecError(f"policy spec {spec!r}: {name!r} is set by the server, not per "
                            f"request (a request may set: {settable or 'nothing'})")
        values[name] = _value(spec, name, raw, hints[name], f.metadata)
    return dataclasses.replace(base if base is not None else cls(), **values)


def describe(cls: type) -> str:
    """One line per option: 'name (default): help'."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(f"{f.name}={default}: {f.metadata.get('help', '')}")
    return "; ".join(out) or "no options"
