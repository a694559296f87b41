"""Sampling maths of the decode loop: per-row random streams, top-k, temperature + top-p,
log-probs.

Randomness is counter-based per (prompt text, sample index, step), so a sample does not depend on
what else shares its batch. Top-p takes the top 64 logits and checks their mass; only rows whose
nucleus is wider than that fall back to a full sort.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

TOP_K_PREFILTER = 64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def row_seeds(seed: int, prompts: list[str], k: int) -> np.ndarray:
    """One 64-bit stream id per (prompt text, sample index): uint64 [P * k]."""
    out = np.empty(len(prompts) * k, dtype=np.uint64)
    for i, text in enumerate(prompts):
        base = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
        b = np.frombuffer(base, dtype=np.uint64)[0]
        out[i * k : (i + 1) * k] = b + np.arange(k, dtype=np.uint64) * _GOLDEN
    return out


def uniforms(seeds: np.ndarray, step: int | np.ndarray) -> np.ndarray:
    """Counter-based U[0, 1) per row for this step (splitmix64 of seed + step): float64 [B].
    step: one step for every row, or each row's own [B] (continuous batching)."""
    with np.errstate(over="ignore"):
        z = seeds + (np.asarray(step, dtype=np.int64) + 1).astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def candidate_probs(vals: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate logits vals [B, m] -> (order [B, m]: candidates by descending logit, stable;
    probs [B, m] float64 in that order = softmax(vals / temperature))."""
    v, order = vals.sort(dim=-1, descending=True, stable=True)
    return order, torch.softmax(v.double() / temperature, -1)


def sample_candidates(ids: torch.Tensor, vals: torch.Tensor, temperature: float, top_p: float,
                      u: np.ndarray, top_k: int = 0) -> torch.Tensor:
    """Sample among given candidates: ids [B, m] tokens with logits vals [B, m] (every other
    token has probability 0), then optional top-k, temperature and nucleus, by inverse CDF.

    Unguided top-k sampling goes through here too (`sample_tokens`), so guided decoding with a
    zero reward samples exactly the same tokens from the same uniforms."""
    if top_k and top_k < vals.shape[-1]:
        vals, j = vals.topk(top_k, dim=-1)
        ids = ids.gather(1, j)
    if temperature == 0:
        return ids.gather(1, vals.argmax(-1, keepdim=True))[:, 0]
    order, probs = candidate_probs(vals, temperature)
    cum = probs.cumsum(-1)  # [B, m]
    uu = torch.from_numpy(u).to(vals.device, torch.float64)
    if top_p >= 1.0:
        j = torch.searchsorted(cum, (uu * cum[:, -1])[:, None], right=True)[:, 0]
        j = j.clamp(max=cum.shape[-1] - 1)
    else:
        j = _nucleus_pick(cum, top_p, uu)
    return ids.gather(1, order.gather(1, j[:, None]))[:, 0]


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: np.ndarray,
                  top_k: int = 0) -> torch.Tensor:
    """Top-k, then temperature + nucleus sampling by inverse CDF with the given uniforms.

    logits [B, V] float32, u [B] -> token ids [B]. temperature 0 is argmax; top_k 0 is off.
    """
    if top_k and top_k < logits.shape[-1]:
        vals, ids = logits.topk(top_k, dim=-1)  # [B, top_k]
        return sample_candidates(ids, vals, temperature, top_p, u)
    if temperature == 0:
        return logits.argmax(-1)
    uu = torch.from_numpy(u).to(logits.device, torch.float64)
    if top_p >= 1.0:  # plain sampling: order does not matter, no sort at all
        z = logits / temperature
        cdf = torch.softmax(z, -1, dtype=torch.float64).cumsum(-1)  # [B, V]
        idx = torch.searchsorted(cdf, (uu * cdf[:, -1])[:, None], right=True)[:, 0]
        return idx.clamp(max=z.shape[-1] - 1)
    # z = logits / temperature is never built whole (a [B, V] pass of its own): dividing by a
    # temperature > 0 keeps the order, so the top logits are z's top entries, and the
    # normaliser is summed over cache-sized row chunks.
    kk = min(TOP_K_PREFILTER, logits.shape[-1])
    vals, ids = logits.topk(kk, dim=-1)  # [B, kk], descending
    vals = vals / temperature  # z's top kk values
    probs = torch.exp(vals.double() - _logsumexp_scaled(logits, temperature, vals[:, :1]).double())
    cum = probs.cumsum(-1)  # [B, kk]
    wide = cum[:, -1] < top_p  # nucleus larger than the prefilter: sort these rows fully
    if bool(wide.any()):
        rows = wide.nonzero()[:, 0]
        fv, fi = (logits[rows] / temperature).sort(dim=-1, descending=True)
        fp = torch.softmax(fv.double(), -1)
        fc = fp.cumsum(-1)
        out = ids[:, 0].clone()
        out[rows] = fi.gather(1, _nucleus_pick(fc, top_p, uu[rows])[:, None])[:, 0]
        keep = (~wide).nonzero()[:, 0]
        if keep.numel():
            out[keep] = ids[keep].gather(1, _nucleus_pick(cum[keep], top_p, uu[keep])[:, None])[:, 0]
        return out
    return ids.gather(1, _nucleus_pick(cum, top_p, uu)[:, None])[:, 0]


LSE_CHUNK_ROWS = 16  # rows of logits per chunk of _logsumexp_scaled (~3 MB at a 49k vocabulary)


def _logsumexp_scaled(logits: torch.Tensor, temperature: float, top: torch.Tensor) -> torch.Tensor:
    """logsumexp(logits / temperature, -1) [B, 1], given top [B, 1] = the row max of that.

    Row chunks small enough to stay in cache; about 4x faster than dividing the [B, V] logits and
    calling torch.logsumexp (each of which passes over all of memory several times)."""
    out = torch.empty_like(top)
    for i in range(0, logits.shape[0], LSE_CHUNK_ROWS):
        j = min(i + LSE_CHUNK_ROWS, logits.shape[0])
        out[i:j] = logits[i:j].div(temperature).sub_(top[i:j]).exp_().sum(-1, keepdim=True)
    return out.log_().add_(top)


def _nucleus_pick(cum: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """cum [R, n] descending-sorted cumulative probs -> chosen column [R] within the nucleus."""
    # Keep column j while the mass before it is < top_p: the smallest set with mass >= top_p.
    n_keep = (cum < top_p).sum(-1) + 1  # [R]
    n_keep = n_keep.clamp(max=cum.shape[-1])
    mass = cum.gather(1, (n_keep - 1)[:, None])[:, 0]
    j = torch.searchsorted(cum, (u * mass)[:, None].to(cum.dtype), right=True)[:, 0]
    return torch.minimum(j, n_keep - 1)


def token_logprobs(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log p(tok) under softmax(logits) (temperature 1, no top-p): logits [A, V], tok [A] -> [A].

    The model's own distribution, as likelihood reranking (the Codex paper) uses it, whatever
    temperature and top-p the sampling used. One logsumexp per row, on CPU in row chunks that
    stay in cache (a pass over the whole [A, V] logits costs as much as the sampling)."""
    picked = logits.gather(1, tok[:, None])[:, 0]  # [A]
    if logits.device.type != "cpu":
        return picked - torch.logsumexp(logits, -1)
    lse = torch.empty_like(picked)
    for i in range(0, logits.shape[0], LSE_CHUNK_ROWS):
        lse[i : i + LSE_CHUNK_ROWS] = torch.logsumexp(logits[i : i + LSE_CHUNK_ROWS], -1)
    return picked - lse
