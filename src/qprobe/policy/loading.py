"""Loading the model a policy runs on: the one place that turns a model argument and the
features a probe or head reads into a loaded model (and an embedder for an API model).

`load_policy_model` is the function; `ModelContext` hands it to the policies being built
(`registry.build`) and keeps the loaded model, so that every policy of one `qprobe serve` or
experiment shares one model: the first policy that needs features picks its layer; a guided
head at another block then runs the model as its own trunk beside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qprobe.errors import QProbeError


def load_policy_model(model: str, *, backend: str | None = None, feature_spec: Any = None,
                      embedder: str | None = None, device: str | None = None,
                      upstream: dict[str, Any] | None = None, layer: int | None = None,
                      chat: bool | None = None) -> tuple[Any, Any]:
    """(LanguageModel, Embedder or None) for a policy reading `feature_spec` (None: no features).

    A local model computes the features itself, at the spec's layer and position, unless an
    `embedder` is given; an API model (http(s)://) returns text, so it needs `embedder`, a local
    model computing the spec's features. layer / chat: a local model's, when no spec sets them
    (a guided head's block and chat setting)."""
    from qprobe.backends import load_embedder, load_model, resolve

    spec = feature_spec
    is_api = not resolve(model, backend).own_features
    emb = None
    if spec is not None and embedder:
        emb = load_embedder(embedder, layer=spec.layer, position=spec.position,
                            feature_dtype=spec.dtype, device=device)
    elif spec is not None and is_api:
        raise QProbeError("an API --model needs --embedder (the local model of the probe)")
    if is_api:
        return load_model(model, backend=backend, **(upstream or {})), emb
    kw: dict[str, Any] = {"layer": layer, "chat": chat}
    if spec is not None:
        kw.update(layer=spec.layer, position=spec.position, feature_dtype=spec.dtype)
    lm = load_model(model, backend=backend, features=emb is None and spec is not None,
                    device=device, **kw)
    return lm, emb


@dataclass
class ModelContext:
    """What policies are built against: the model argument and its options, the loaded model
    (loaded by the first policy that asks), and what a probe may need beside it."""

    name: str = "default"
    backend: str | None = None
    embedder_name: str | None = None
    device: str | None = None
    upstream: dict[str, Any] | None = None
    chat: bool | None = None  # the chat template on / off (None: as the policy or model says)
    visible: Any = None  # f(prompts, completions) for probes reading visible_pass (a code task)
    kind: str = ""  # the kind being built (set by registry.build)
    loaded: Any = None
    embedder: Any = None
    _spec: Any = field(default=None, repr=False)

    @property
    def is_api(self) -> bool:
        from qprobe.backends import resolve

        return not resolve(self.name, self.backend).own_features

    def model(self, feature_spec: Any = None, layer: int | None = None,
              chat: bool | None = None, local: bool = False, what: str = "") -> Any:
        """The shared model, loaded on first use for `feature_spec` (or a local model at
        `layer` with `chat`). local: the policy needs a local model (`what` says why)."""
        if local and self.is_api:
            raise QProbeError(f"policy {self.kind}: {what}; --model must be a local model")
        chat = self.chat if self.chat is not None else chat
        if self.loaded is None:
            self.loaded, self.embedder = load_policy_model(
                self.name, backend=self.backend, feature_spec=feature_spec,
                embedder=self.embedder_name, device=self.device, upstream=self.upstream,
                layer=layer, chat=chat)
            self._spec = feature_spec
        elif feature_spec is not None:
            got = self.embedder.feature_spec if self.embedder is not None \
                else self.loaded.feature_spec
            if got is None:
                raise QProbeError(f"policy {self.kind}: the model was loaded without features "
                                  "for an earlier policy; list the policies that read a probe "
                                  "first")
        return self.loaded
