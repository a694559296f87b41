"""What the server serves: one model argument and the policies on it, each a served model id.

Each policy (`--policy NAME=SPEC`, or `--probe NAME=DIR`, the short form of
`NAME=best-of-k:probe=DIR`) is served as the model id `{base}:{NAME}`, and the first one also as
plain `{base}`, so an OpenAI client picks the policy with `model=`. The policies are built by the
policy registry (`policy/registry.py`) over one `ModelContext`, so they share the loaded model:
best-of-k policies on probes of the same features (model, layer, position) share one decode
batch, since the model computes each sample's feature once and any probe scores it.

The model is local (in process, with its own features) or an upstream OpenAI-compatible server
(text only; features from a local embedder, as `qprobe collect` does for API models). Guided and
adapter policies need a local model (an adapter loads the base model it was trained on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass
class ServedPolicy:
    """One policy as a served model id."""

    id: str  # `{base}:{name}`
    name: str
    spec: str  # as given (for /v1/models and logs)
    policy: Any  # qprobe.policy.base.Policy


def parse_probe_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' -> (folder name, PATH)."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
    else:
        name, path = Path(arg.rstrip("/")).name, arg
    _check_name(name, "NAME=PATH")
    return name, path


def parse_policy_arg(arg: str) -> tuple[str, str]:
    """'NAME=SPEC' -> (NAME, SPEC); a bare SPEC is named by its kind ('guided', 'greedy')."""
    head, eq, rest = arg.partition("=")
    if eq and ":" not in head:  # NAME=SPEC (a spec's own '=' come after its 'KIND:')
        name, spec = head, rest
    else:
        name, spec = arg.split(":", 1)[0], arg
    _check_name(name, "NAME=SPEC")
    return name, spec


def _check_name(name: str, form: str) -> None:
    if not NAME_RE.match(name):
        raise QProbeError(f"serve: policy name {name!r} may hold only letters, digits, '_', '.', "
                          f"'-' (give {form})")


def base_name(model: str) -> str:
    """The served base id of a model argument: a file or folder's name without '.gguf'."""
    if model.startswith(("http://", "https://")):
        return "upstream"
    name = Path(model.rstrip("/")).name or model
    name = name[:-5] if name.endswith(".gguf") else name
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name) or "model"


class ServedModels:
    """The served policies behind the endpoints: `{base}:{name}` -> `ServedPolicy`."""

    def __init__(self, base: str, policies: list[ServedPolicy]) -> None:
        if not policies:
            raise QProbeError("serve: give at least one --policy or --probe")
        if not NAME_RE.match(base):
            raise QProbeError(f"serve: served name {base!r} may hold only letters, digits, "
                              "'_', '.', '-'")
        self.base = base
        self.policies: dict[str, ServedPolicy] = {}
        for p in policies:
            if p.id in self.policies:
                raise QProbeError(f"serve: two policies are named {p.name!r}; use NAME=...")
            self.policies[p.id] = p
        self.default = policies[0]

    def ids(self) -> list[str]:
        return [self.base, *self.policies]

    def get(self, model_id: str | None) -> ServedPolicy | None:
        """The policy a request's `model` names (None: unknown)."""
        if model_id == self.base:
            return self.default
        return self.policies.get(model_id or "")


def prompt_tokens(model: Any, prompt: str) -> int:
    """Tokens of the prompt as a local model reads it (0 when the model is remote)."""
    tok = getattr(model, "tok", None)
    return len(tok.prompt_ids(prompt)) if tok is not None else 0


def load_served(model: str, policy_args: list[str], *, probe_args: list[str] = (),
                k: int = 8, beta: float | None = None, backend: str | None = None,
                embedder: str | None = None, base: str | None = None,
                upstream: dict[str, Any] | None = None,
                device: str | None = None) -> ServedModels:
    """Build the policies (`--probe` short forms first, with the server's k and beta, then each
    `--policy NAME=SPEC`) over one shared model context."""
    from qprobe.policy import registry, specs
    from qprobe.policy.loading import ModelContext

    ctx = ModelContext(model, backend=backend, embedder_name=embedder, device=device,
                       upstream=upstream)
    named: list[tuple[str, str, str, Any]] = []  # (name, spec, kind, config)
    for arg in probe_args:
        name, path = parse_probe_arg(arg)
        named.append((name, f"best-of-k:probe={path}", "best-of-k",
                      specs.BestOfKSpec(probe=path, k=k, beta=beta)))
    for arg in policy_args:
        name, spec = parse_policy_arg(arg)
        kind, cfg = registry.read(spec)
        named.append((name, spec, kind.key, cfg))
    if not named:
        raise QProbeError("serve: give at least one --policy NAME=SPEC or --probe")
    # Policies reading a probe first: the first of them sets the model's feature layer.
    order = sorted(range(len(named)),
                   key=lambda i: "probe" not in registry.POLICIES[named[i][2]].load().needs)
    built: dict[int, Any] = {}
    for i in order:
        name, spec, key, cfg = named[i]
        try:
            built[i] = registry.build_config(key, cfg, ctx)
        except QProbeError as e:
            raise QProbeError(f"serve: policy {name!r} ({spec}): {e}") from None
    lm = ctx.loaded
    b = base or (getattr(lm, "model", None) if ctx.loaded is not None and ctx.is_api
                 else base_name(model))
    b = re.sub(r"[^A-Za-z0-9_.\-]", "-", str(b))
    return ServedModels(b, [ServedPolicy(f"{b}:{name}", name, spec, built[i])
                            for i, (name, spec, _, _) in enumerate(named)])
