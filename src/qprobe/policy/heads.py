"""Token-level reward heads for guided decoding: RAD's linear head and ARM's bilinear head.

Both read a hidden state h (the residual stream after block `layer` of a "trunk" model, the same
vector as a Q-probe feature) and are standardised inside, like probes: h_ = (h - mean) / std.

- **rad**  r(prefix) = w . h_(prefix) + c. Scoring a candidate next token v means running the
  trunk on prefix + v, so a step with k candidates costs k trunk token-forwards (Deng & Raffel
  2023, "reward-augmented decoding").
- **arm**  r(prefix, v) = e_v^T P Q^T h_(prefix) + b . h_(prefix) + c: one hidden state of the
  prefix scores every next token v. e_v is the trunk's frozen output embedding of v (its lm_head
  row), W = P Q^T a rank-`rank` matrix (rank = dim is a full d x d W), b the prefix baseline
  (Troshin, Niculae & Fokkens 2024, "autoregressive reward model"). One trunk forward per token,
  none at all when the trunk is the generating model itself ("own hidden state").

`raw` is the head's output; `link` ("sigmoid" or "identity") maps it to the reward the training
loss compares with its target and that decoding adds (clamped to [0, 1], except for a head
trained from preference pairs) to the logits.

On disk, like a probe folder:

    HEAD_DIR/head.safetensors   mean, std and the head's weights
    HEAD_DIR/config.json        format, kind, rank, link, feature spec (trunk identity, layer,
                                dim), tokenizer identity, the trunk's load name, training info

A head refuses a model whose tokenizer or width differs from the one it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec

FORMAT = "qprobe-head/1"
WEIGHTS = "head.safetensors"
CONFIG = "config.json"
KINDS = ("rad", "arm")
LINKS = ("sigmoid", "identity")


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """{"sha256", "size"} of a tokenizer's vocabulary (token -> id), so a head can tell whether a
    model writes token ids that mean what they meant in training."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    h = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
    return {"sha256": h, "size": len(items)}


class RewardHead(nn.Module):
    """A token-level reward head (kind "rad" or "arm"), see the module docstring."""

    def __init__(self, kind: str, dim: int, *, rank: int = 0, link: str = "sigmoid",
                 feature_spec: FeatureSpec | None = None, tokenizer: dict[str, Any] | None = None,
                 trunk: str | None = None, mean: np.ndarray | torch.Tensor | None = None,
                 std: np.ndarray | torch.Tensor | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise QProbeError(f"head: kind must be one of {KINDS}, got {kind!r}")
        if link not in LINKS:
            raise QProbeError(f"head: link must be one of {LINKS}, got {link!r}")
        if kind == "arm" and not 1 <= int(rank) <= int(dim):
            raise QProbeError(f"head: an arm head needs 1 <= rank <= dim ({dim}), got {rank}")
        if feature_spec is not None and int(feature_spec.dim) != int(dim):
            raise FeatureSpecMismatch(f"head: feature spec dim {feature_spec.dim} is not {dim}")
        self.kind, self.dim, self.link = kind, int(dim), link
        self.rank = int(rank) if kind == "arm" else 0
        self.feature_spec = feature_spec
        self.tokenizer = dict(tokenizer or {})
        self.trunk = trunk  # how to load the trunk model (e.g. "default", a folder)
        self.info: dict[str, Any] = dict(info or {})
        self.register_buffer("mean", torch.zeros(dim) if mean is None
                             else torch.as_tensor(mean, dtype=torch.float32).reshape(dim))
        self.register_buffer("std", torch.ones(dim) if std is None
                             else torch.as_tensor(std, dtype=torch.float32).reshape(dim))
        self.bias = nn.Parameter(torch.zeros(()))  # c
        if kind == "rad":
            self.w = nn.Parameter(torch.zeros(dim))
        else:
            # P random, Q zero: the head starts at r = c with a non-zero gradient for Q.
            self.P = nn.Parameter(torch.randn(dim, self.rank) / dim**0.5)
            self.Q = nn.Parameter(torch.zeros(dim, self.rank))
            self.b = nn.Parameter(torch.zeros(dim))
        self._ep: torch.Tensor | None = None  # E @ P [V, rank], see bind()

    # --- scoring ---------------------------------------------------------------------------
    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() - self.mean) / self.std

    def rad_raw(self, h: torch.Tensor) -> torch.Tensor:
        """RAD: raw rewards of prefixes whose last hidden state is h [..., D] -> [...]."""
        return self.standardise(h) @ self.w + self.bias

    def arm_raw(self, h: torch.Tensor, ids: torch.Tensor, emb: torch.Tensor | None = None
                ) -> torch.Tensor:
        """ARM: raw rewards of prefix + v for prefix hidden states h [N, D] and candidate tokens
        ids [N, k] -> [N, k]. emb: the trunk's output embeddings [V, D] (default: the ones given
        to `bind`, with E @ P precomputed)."""
        hs = self.standardise(h)  # [N, D]
        z = hs @ self.Q  # [N, r]
        if emb is None:
            if self._ep is None:
                raise QProbeError("head: an arm head needs bind(output_embeddings) before scoring")
            ep = self._ep[ids]  # [N, k, r]
        else:
            ep = emb[ids].float() @ self.P  # [N, k, r]
        return (ep * z[:, None, :]).sum(-1) + (hs @ self.b + self.bias)[:, None]

    def reward(self, raw: torch.Tensor) -> torch.Tensor:
        """The head's reward (what it was trained to predict) from its raw output."""
        return torch.sigmoid(raw) if self.link == "sigmoid" else raw

    @torch.no_grad()
    def bind(self, emb: torch.Tensor) -> RewardHead:
        """Precompute E @ P [V, rank] from the trunk's output embeddings emb [V, D] (arm)."""
        if self.kind == "arm":
            if emb.shape[1] != self.dim:
                raise FeatureSpecMismatch(f"head: output embeddings of width {emb.shape[1]}, "
                                          f"the head reads {self.dim}")
            self._ep = (emb.float() @ self.P).contiguous()
        return self

    # --- checks ----------------------------------------------------------------------------
    def check_model(self, tokenizer, dim: int, where: str = "head") -> None:
        """Refuse a model whose tokenizer or hidden width is not the head's."""
        if int(dim) != self.dim:
            raise FeatureSpecMismatch(f"{where}: the head reads hidden states of width {self.dim}, "
                                      f"this model's are {dim}")
        if self.tokenizer:
            mine = tokenizer_identity(tokenizer)
            if mine["sha256"] != self.tokenizer.get("sha256"):
                raise QProbeError(
                    f"{where}: the head was trained with another tokenizer ({self.tokenizer.get('size')} "
                    f"tokens, sha256 {str(self.tokenizer.get('sha256'))[:12]}); this model's has "
                    f"{mine['size']} tokens, sha256 {mine['sha256'][:12]}")

    # --- persistence -----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        from qprobe import __version__

        return {"format": FORMAT, "kind": self.kind, "dim": self.dim, "rank": self.rank,
                "link": self.link,
                "feature_spec": self.feature_spec.to_dict() if self.feature_spec else None,
                "tokenizer": self.tokenizer, "trunk": self.trunk, "info": self.info,
                "qprobe_version": __version__}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the head folder atomically (temp folder beside it, then rename)."""
        from qprobe.fileio import save_weights_folder

        return save_weights_folder(out_dir, self.state_dict(), self.config(), what="head",
                                   weights=WEIGHTS, config_name=CONFIG)

    @classmethod
    def load(cls, head_dir: str | os.PathLike) -> RewardHead:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from qprobe.fileio import read_weights_config

        cfg, cfg_path, w_path = read_weights_config(head_dir, what="reward head", fmt=FORMAT,
                                                    weights=WEIGHTS, config_name=CONFIG)
        spec = cfg.get("feature_spec")
        spec = FeatureSpec.from_dict(spec, f"{cfg_path}: feature_spec") if spec else None
        try:
            head = cls(str(cfg["kind"]), int(cfg["dim"]), rank=int(cfg.get("rank", 0)),
                       link=str(cfg.get("link", "sigmoid")), feature_spec=spec,
                       tokenizer=cfg.get("tokenizer"), trunk=cfg.get("trunk"),
                       info=cfg.get("info"))
        except (KeyError, TypeError, ValueError) as e:
            raise QProbeError(f"{cfg_path}: missing or bad field ({e})") from None
        try:
            head.load_state_dict(load_file(str(w_path)), strict=True)
        except (SafetensorError, OSError) as e:
            raise QProbeError(f"{w_path}: cannot read weights ({e})") from None
        except RuntimeError as e:
            raise QProbeError(f"{w_path}: weights do not match config.json "
                              f"({str(e).strip().splitlines()[-1].strip()})") from None
        return head.eval()
