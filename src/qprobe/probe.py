"""The probe: a small torch module Q(x, a) = net(standardise(phi(x, a))), saved as a folder.

A probe is linear by default (`hidden=()`) or an MLP with ReLU hidden layers. Optional feature
standardisation ((phi - mean) / std, statistics fitted on the training rows) lives inside the
probe, so users always pass raw features. On disk:

    PROBE_DIR/probe.safetensors   net.* weights, plus `mean` / `std` when standardising
    PROBE_DIR/config.json         format, objective, beta, architecture, feature spec,
                                  training-data fingerprint, train config, qprobe version

Library use:

    probe = Probe.load("probes/mbpp")
    scores = probe.score(features)   # [N, D] float16 / float32 numpy -> [N] float32
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec

FORMAT = "qprobe-probe/1"
WEIGHTS = "probe.safetensors"
CONFIG = "config.json"
SCORE_CHUNK = 8192  # rows converted to float32 at a time in `score`
LOGLIK_EXTRAS = ("logprob_mean", "logprob_sum", "logprob_tokens")
# optional inputs after the features: the model's own log-likelihood of the sample, and whether
# the sample passes the tests its prompt shows (`visible_reward`, 0.5 where the prompt shows none)
EXTRAS = (*LOGLIK_EXTRAS, "visible_pass")
# log p(instruction | program) from `qprobe review` (review.py), alone and added to the coder's
REVIEWER_EXTRAS = ("reviewer_sum", "reviewer_mean", "coder_reviewer", "coder_reviewer_mean")
EXTRAS = (*EXTRAS, *REVIEWER_EXTRAS)
# execution signals (`qprobe signals`, qprobe/verifier/agreement.py): error class of the shown
# test, MBR-exec agreement, model-written tests passed and the CodeT score
EXEC_EXTRAS = ("visible_wrong", "visible_error", "visible_syntax", "mbr_share", "mbr_size",
               "mbr_gen_share", "gen_pass", "gen_pass_frac", "codet_score", "mbr_fuzz_share",
               "mbr_fuzz_size")
EXTRAS = (*EXTRAS, *EXEC_EXTRAS)
# extras that may gate a probe's choice (1 pass, 0 fail, 0.5 unknown) and the score added per
# unit of it: larger than any Q a standardised linear probe reaches, so the gate decides first
GATES = ("visible_pass",)
GATE_WEIGHT = 1e3


def build_net(dim: int, hidden: tuple[int, ...] | list[int] = ()) -> nn.Sequential:
    """Linear (hidden=()) or MLP net mapping [N, dim] -> [N, 1].

    The output layer starts at zero, so a fresh probe scores every candidate 0: the selection
    policy starts as the base model's own sampling (uniform over the k candidates).
    """
    layers: list[nn.Module] = []
    d = dim
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    out = nn.Linear(d, 1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


class Probe(nn.Module):
    """A Q-probe: scores feature vectors; knows its feature spec, objective and beta."""

    def __init__(
        self,
        dim: int,
        hidden: tuple[int, ...] | list[int] = (),
        *,
        beta: float = 0.1,
        objective: str = "q",
        feature_spec: FeatureSpec | None = None,
        mean: np.ndarray | torch.Tensor | None = None,
        std: np.ndarray | torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
        extras: tuple[str, ...] | list[str] = (),
        gate: str | None = None,
    ) -> None:
        super().__init__()
        bad = [e for e in extras if e not in EXTRAS]
        if bad:
            raise QProbeError(f"probe: unknown extra input(s) {bad}; known: {list(EXTRAS)}")
        self.extras = tuple(extras)
        if gate is not None and gate not in GATES:
            raise QProbeError(f"probe: gate {gate!r} is not one of {list(GATES)}")
        if gate is not None and gate not in self.extras:
            raise QProbeError(f"probe: gate {gate!r} must be one of its extra inputs {list(extras)}")
        # A gate puts every candidate that passes it (value 1) above every one that fails (0),
        # whatever Q says: the shown-test filter as a hard rule, the probe ranking inside it.
        self.gate = gate
        if feature_spec is not None and int(feature_spec.dim) + len(self.extras) != int(dim):
            raise FeatureSpecMismatch(
                f"probe: feature spec dim {feature_spec.dim} differs from probe dim {dim}"
                + (f" less its {len(self.extras)} extra input(s)" if self.extras else "")
            )
        self.dim = int(dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.beta = float(beta)
        self.objective = objective
        self.feature_spec = feature_spec
        self.info: dict[str, Any] = dict(info or {})  # fingerprint, train config, metrics
        self.net = build_net(self.dim, self.hidden)
        self.standardize = mean is not None
        if (mean is None) != (std is None):
            raise ValueError("probe: give both mean and std, or neither")
        if mean is not None:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(dim))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(dim))

    # --- scoring ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of raw features x: [N, D] float32 -> [N]."""
        if self.standardize:
            x = (x - self.mean) / self.std
        return self.net(x).squeeze(-1)

    @property
    def feature_dim(self) -> int:
        """Width of the hidden-state feature part of the input (0: extras only)."""
        return self.dim - len(self.extras)

    def check_features(self, spec: FeatureSpec | None = None, dim: int | None = None,
                       where: str = "features") -> None:
        """Raise FeatureSpecMismatch if features of `spec` / width `dim` do not fit this probe.

        `dim` is the width of a full input matrix (features and extras, as `score` takes)."""
        if spec is not None:
            if self.feature_spec is not None:
                self.feature_spec.check_compatible(spec, where)
            elif int(spec.dim) != self.feature_dim:
                raise FeatureSpecMismatch(
                    f"{where}: dimension {spec.dim} does not match the probe's {self.feature_dim}"
                )
        if dim is not None and int(dim) != self.dim:
            hint = (f" ({self.feature_dim} features + extra inputs {list(self.extras)}: use "
                    "probe.inputs(...) or probe.score_rollouts(...))") if self.extras else ""
            raise FeatureSpecMismatch(
                f"{where}: dimension {dim} does not match the probe's {self.dim}{hint}"
            )

    def inputs(self, features: np.ndarray | None, columns: dict[str, np.ndarray] | None
               ) -> np.ndarray:
        """The probe's input matrix [N, dim]: hidden-state features, then the extra inputs.

        columns: arrays [N] named as the extras ("logprob_mean", ..., "visible_pass":
        Rollouts.extra_inputs(), or `loglik_of(samples)` plus visible rewards for fresh samples);
        needed only when the probe has extras."""
        return build_inputs(features if self.feature_dim else None, columns, self.extras)

    def score_rollouts(self, r: Any) -> np.ndarray:
        """Scores [N] of a rollouts folder's samples, reading the feature set and the
        log-likelihoods this probe was trained on."""
        from qprobe.rollouts import feature_set_name

        feats = None
        if self.feature_dim:
            if self.feature_spec is not None:
                name = feature_set_name(self.feature_spec)
                sets = r.feature_sets
                if name not in sets:
                    raise FeatureSpecMismatch(
                        f"{r.path}: no feature set {name} for this probe (have {sorted(sets)}; "
                        "`qprobe embed --layers ...` adds sets)")
                self.check_features(sets[name], where=str(r.path))
                feats = r.features_of(name)
            else:
                feats = r.features
        cols = r.extra_inputs() if self.extras else None
        missing = [e for e in self.extras if e not in (cols or {})]
        if missing:
            how = ("run `qprobe embed` on it" if set(missing) & set(LOGLIK_EXTRAS) else
                   "run `qprobe signals --exec / --gen-tests / --gen-exec` on it"
                   if set(missing) & set(EXEC_EXTRAS) else "run `qprobe score --visible` on it")
            if set(missing) & set(REVIEWER_EXTRAS):
                how = "run `qprobe review` (and `qprobe embed` for coder_reviewer) on it"
            raise QProbeError(f"{r.path}: this probe reads {missing}, which the folder lacks ({how})")
        return self.score(self.inputs(feats, cols))

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        """Probe scores Q for a feature matrix: [N, D] float16/float32 numpy -> [N] float32."""
        x = np.asarray(features)
        if x.ndim != 2:
            raise QProbeError(f"probe.score: features must be 2-D [N, D], got shape {x.shape}")
        self.check_features(dim=x.shape[1])
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise QProbeError(f"probe.score: features must be float16/float32, got {x.dtype}")
        was_training = self.training
        self.eval()
        out = np.empty(len(x), dtype=np.float32)  # [N]
        for i in range(0, len(x), SCORE_CHUNK):
            chunk = torch.tensor(x[i : i + SCORE_CHUNK], dtype=torch.float32)  # copy: x may be
            # a read-only memory map
            out[i : i + len(chunk)] = self(chunk).numpy()
        self.train(was_training)
        if not np.isfinite(out).all():
            raise QProbeError("probe.score: features gave non-finite scores (NaN/inf in input?)")
        if self.gate is not None:
            col = x[:, self.feature_dim + self.extras.index(self.gate)].astype(np.float64)  # [N]
            out = (out + GATE_WEIGHT * col).astype(np.float32)
        return out

    # --- persistence -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        from qprobe import __version__

        return {
            "format": FORMAT,
            "objective": self.objective,
            "beta": self.beta,
            "architecture": {
                "type": "mlp" if self.hidden else "linear",
                "dim": self.dim,
                "hidden": list(self.hidden),
                "standardize": self.standardize,
            },
            "feature_spec": self.feature_spec.to_dict() if self.feature_spec else None,
            **({"extras": list(self.extras)} if self.extras else {}),
            **({"gate": self.gate} if self.gate else {}),
            **self.info,
            "qprobe_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the probe folder atomically (temp folder beside it, then rename)."""
        from qprobe.fileio import save_weights_folder

        return save_weights_folder(out_dir, self.state_dict(), self.config(), what="probe",
                                   weights=WEIGHTS, config_name=CONFIG)

    @classmethod
    def load(cls, probe_dir: str | os.PathLike, feature_spec: FeatureSpec | None = None) -> Probe:
        """Load a probe folder; with `feature_spec`, refuse features of another spec."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from qprobe.fileio import read_weights_config

        d = Path(probe_dir)
        cfg, cfg_path, w_path = read_weights_config(d, what="probe", fmt=FORMAT,
                                                    weights=WEIGHTS, config_name=CONFIG)
        try:
            arch = cfg["architecture"]
            dim, hidden, std_on = int(arch["dim"]), tuple(arch["hidden"]), bool(arch["standardize"])
            beta, objective = float(cfg["beta"]), str(cfg["objective"])
        except (KeyError, TypeError, ValueError) as e:
            raise QProbeError(f"{cfg_path}: missing or bad field ({e})") from None
        spec = cfg.get("feature_spec")
        spec = FeatureSpec.from_dict(spec, f"{cfg_path}: feature_spec") if spec else None
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError) as e:
            raise QProbeError(f"{w_path}: cannot read weights ({e})") from None
        if std_on and ("mean" not in tensors or "std" not in tensors):
            raise QProbeError(f"{w_path}: standardisation statistics missing")
        extras = cfg.get("extras", [])
        known = {"format", "objective", "beta", "architecture", "feature_spec", "qprobe_version",
                 "extras", "gate"}
        info = {k: v for k, v in cfg.items() if k not in known}
        try:
            probe = cls(
                dim, hidden, beta=beta, objective=objective, feature_spec=spec,
                mean=tensors.get("mean") if std_on else None,
                std=tensors.get("std") if std_on else None, info=info, extras=extras,
                gate=cfg.get("gate"),
            )
            probe.load_state_dict(tensors, strict=True)
        except QProbeError as e:
            raise type(e)(f"{d}: {e}") from None
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise QProbeError(f"{w_path}: weights do not match config.json ({first[-1].strip()})"
                              ) from None
        probe.eval()
        if feature_spec is not None:
            probe.check_features(feature_spec, where=str(d))
        return probe


def build_inputs(features: np.ndarray | None, columns: dict[str, np.ndarray] | None,
                 extras: tuple[str, ...] | list[str]) -> np.ndarray:
    """[N, D + E]: features (or none) followed by the named extra columns.

    Extras are the model's own view of the sample, `logprob_mean` (mean token log-probability,
    what Codex-style reranking sorts by), `logprob_sum`, `logprob_tokens` (length), and
    `visible_pass` (the sample passes the tests shown in its prompt: 1, 0; 0.5 if none shown)."""
    bad = [e for e in extras if e not in EXTRAS]
    if bad:
        raise QProbeError(f"probe inputs: unknown extra input(s) {bad}; known: {list(EXTRAS)}")
    parts = []
    if features is not None:
        parts.append(np.asarray(features, dtype=np.float32))
    if extras:
        missing = [e for e in extras if e not in (columns or {})]
        if missing:
            raise QProbeError(f"probe inputs: no values for extra input(s) {missing}")
        parts.append(np.stack([np.asarray(columns[e], dtype=np.float32) for e in extras], axis=1))
    if not parts:
        raise QProbeError("probe inputs: neither features nor extras")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def loglik_of(samples: list[Any]) -> dict[str, np.ndarray] | None:
    """The log-likelihood columns of fresh samples (`Sample.logprob_sum`, token ids), or None."""
    sums = [getattr(s, "logprob_sum", None) for s in samples]
    if any(v is None for v in sums):
        return None
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray([len(x.token_ids) for x in samples], dtype=np.int64)
    return {"logprob_sum": s, "logprob_tokens": n, "logprob_mean": s / np.maximum(n, 1)}


def fingerprint(
    features: np.ndarray,
    rewards: np.ndarray | None = None,
    prompt_ids: np.ndarray | list[str] | None = None,
    pairs: np.ndarray | None = None,
    chunk_rows: int = 4096,
) -> str:
    """sha256 of the training data (features bytes as stored, rewards, prompt ids, pairs).

    Two probes with the same fingerprint were trained on byte-identical data.
    """
    h = hashlib.sha256()
    f = np.asarray(features)
    h.update(f"{f.dtype.str}{f.shape}".encode())
    for i in range(0, len(f), chunk_rows):  # chunked: memory-mapped shards stay unread until here
        h.update(np.ascontiguousarray(f[i : i + chunk_rows]).tobytes())
    if rewards is not None:
        h.update(b"rewards")
        h.update(np.ascontiguousarray(rewards, dtype=np.float32).tobytes())
    if prompt_ids is not None:
        h.update(b"prompt_ids")
        h.update("\x00".join(str(p) for p in prompt_ids).encode())
    if pairs is not None:
        h.update(b"pairs")
        h.update(np.ascontiguousarray(pairs, dtype=np.int64).tobytes())
    return h.hexdigest()
