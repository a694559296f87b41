"""What the server serves: one sampling model and one or more probes on its features.

Each probe is served as a model id `{base}:{probe}` (and the first one also as plain `{base}`),
so an OpenAI client picks the probe with `model=`. All probes read the same features (model,
layer, position): the model computes them once per sample, whichever probe scores them, which is
what lets requests for different probes share one decode batch.

The model is local (in process, with its own features) or an upstream OpenAI-compatible server
(text only; features from a local embedder, as `qprobe collect` does for API models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class ServedProbe:
    """One probe as a served model id."""

    id: str  # `{base}:{name}`
    name: str
    path: str
    probe: Any  # qprobe.probe.Probe


def parse_probe_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' -> (folder name, PATH)."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
    else:
        name, path = Path(arg.rstrip("/")).name, arg
    if not NAME_RE.match(name):
        raise QProbeError(f"serve: probe name {name!r} may hold only letters, digits, '_', '.', '-'"
                          " (give NAME=PATH)")
    return name, path


def base_name(model: str) -> str:
    """The served base id of a model argument: a file or folder's name without '.gguf'."""
    if model.startswith(("http://", "https://")):
        return "upstream"
    name = Path(model.rstrip("/")).name or model
    name = name[:-5] if name.endswith(".gguf") else name
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name) or "model"


class ServedModels:
    """The (model, probes) registry behind the endpoints.

    model: a `LanguageModel`; embedder: an `Embedder` when the model gives no features (an API
    model), else None; probes: the served probes, all on the same feature spec.
    """

    def __init__(self, base: str, model: Any, probes: list[ServedProbe],
                 embedder: Any = None) -> None:
        if not probes:
            raise QProbeError("serve: give at least one --probe")
        if not NAME_RE.match(base):
            raise QProbeError(f"serve: served name {base!r} may hold only letters, digits, "
                              "'_', '.', '-'")
        self.base, self.model, self.embedder = base, model, embedder
        self.probes: dict[str, ServedProbe] = {}
        for p in probes:
            if p.id in self.probes:
                raise QProbeError(f"serve: two probes are named {p.name!r}; use NAME=PATH")
            self.probes[p.id] = p
        self.default = probes[0]

    def ids(self) -> list[str]:
        return [self.base, *self.probes]

    def get(self, model_id: str | None) -> ServedProbe | None:
        """The probe a request's `model` names (None: unknown)."""
        if model_id == self.base:
            return self.default
        return self.probes.get(model_id or "")

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the prompt as the local model reads it (0 when the model is remote)."""
        tok = getattr(self.model, "tok", None)
        return len(tok.prompt_ids(prompt)) if tok is not None else 0


def load_served(model: str, probe_args: list[str], *, backend: str | None = None,
                embedder: str | None = None, base: str | None = None,
                upstream: dict[str, Any] | None = None,
                device: str | None = None) -> ServedModels:
    """Load the probes, then the model with the probes' feature layer (see `generate`) on
    `device` (a local model or embedder; default: cuda if any)."""
    from qprobe.backends import load_embedder, load_model, resolve
    from qprobe.probe import REVIEWER_EXTRAS, Probe

    if not probe_args:
        raise QProbeError("serve: give at least one --probe")
    loaded = []
    for arg in probe_args:
        name, path = parse_probe_arg(arg)
        probe = Probe.load(path)
        if "visible_pass" in probe.extras:
            raise QProbeError(f"serve: {path} reads visible_pass (the prompt's shown tests, run "
                              "in the sandbox); the server does not run code: serve a probe "
                              "without it")
        if set(probe.extras) & set(REVIEWER_EXTRAS):
            raise QProbeError(f"serve: {path} reads the reviewer likelihood (`qprobe review`), "
                              "computed for stored rollouts only: serve a probe without it")
        loaded.append((name, path, probe))
    specs = {None if p.feature_spec is None else p.feature_spec.to_dict().__repr__()
             for _, _, p in loaded if p.feature_dim}
    if len(specs) > 1:
        raise QProbeError("serve: the probes read different features (model, layer or position);"
                          " serve them from separate servers")
    spec = next((p.feature_spec for _, _, p in loaded if p.feature_dim), None)
    if spec is None and any(p.feature_dim for _, _, p in loaded):
        raise QProbeError(f"{loaded[0][1]}: probe has no feature spec; cannot pick a model layer")
    is_api = not resolve(model, backend).own_features
    emb = None
    if spec is not None and embedder:
        emb = load_embedder(embedder, layer=spec.layer, position=spec.position,
                            feature_dtype=spec.dtype, device=device)
    elif spec is not None and is_api:
        raise QProbeError("serve: an API --model needs --embedder (the local model of the probe)")
    if is_api:
        lm = load_model(model, backend=backend, **(upstream or {}))
    else:
        kw = {} if spec is None else {"layer": spec.layer, "position": spec.position,
                                      "feature_dtype": spec.dtype}
        lm = load_model(model, backend=backend, features=emb is None and spec is not None,
                        device=device, **kw)
    # Check every probe against the features it will get, now rather than at the first request.
    got = (emb.feature_spec if emb is not None else lm.feature_spec) if spec is not None else None
    for name, _, p in loaded:
        if p.feature_dim:
            p.check_features(got, where=f"serve: probe {name!r} vs model {model!r}")
    b = base or (lm.model if is_api and hasattr(lm, "model") else base_name(model))
    b = re.sub(r"[^A-Za-z0-9_.\-]", "-", b)
    return ServedModels(b, lm, [ServedProbe(f"{b}:{n}", n, path, p) for n, path, p in loaded],
                        embedder=emb)
