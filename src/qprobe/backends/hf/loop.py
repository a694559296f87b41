"""The k-sample decode loop: prefill once, then one token per row per step until every row ends.

Why not `model.generate`: for best-of-k sampling it prefills every prompt k times, grows its KV
cache by concatenation, sorts the whole vocabulary for top-p at every step, and (with
`output_hidden_states`) keeps every layer's hidden state at every step. Here instead:

- the decoder (`llama.FastDecoder`, or `generic.GenericDecoder` for other architectures)
  prefills each prompt once and shares its cache between the prompt's k rows;
- tokens every prompt of a batch starts with run once (a shared prefix, FastDecoder only);
- a row that finishes (EOS, stop string) leaves the batch at once: its matmuls stop, so a
  few long samples do not make every short one pay for their length;
- sampling (`sampling.py`) is counter-based per (prompt, sample, step), so a sample does not
  depend on what else shares its batch;
- the Q-probe feature is the residual stream after block `layer` for the current step only,
  copied into a [rows, steps, dim] buffer; the stop-string cut then picks the last kept token.
  A completion that ran to max_new_tokens gets one extra partial forward (up to `layer`) for its
  last token;
- each sampled token's log-probability under the model's own distribution (temperature 1, no
  top-p) is recorded, and summed over the kept tokens (`RowResult.logprob_sum`);
- an optional `StepHook` sees each step's hidden state and logits and may change the logits
  before sampling (token-level guided decoding); without one the loop does exactly what it
  would do without the seam;
- an optional `StepObserver` sees each step's sampled tokens as soon as they are decided (what
  `qprobe serve` streams); it changes nothing.

Shapes: P prompts, k samples each, B = P * k rows, A computed (unfinished) rows, T0 padded prompt
length, D hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from qprobe.backends.hf.llama import FastDecoder
from qprobe.backends.hf.sampling import (
    row_seeds,
    sample_candidates,
    sample_tokens,
    token_logprobs,
    uniforms,
)

MIN_SHARED_PREFIX = 16  # prompts of a batch starting with this many equal tokens share them


@dataclass(frozen=True)
class LiveRows:
    """Who the A computed rows of one step are (finished rows have already left the batch).

    prompt: [A] int64, each row's prompt as an index into the list given to `sample`;
    sample: [A] int64, its sample index j in 0..k-1;
    tokens: [A, step] int64, the tokens each row has sampled so far.
    """

    prompt: np.ndarray
    sample: np.ndarray
    tokens: np.ndarray


@dataclass(frozen=True)
class Candidates:
    """A step hook's answer restricting the next token to a few candidates per row.

    ids: [A, m] int64 token ids; logits: [A, m] float32, the logits to sample them by (every
    other token gets probability 0). Cheaper than a full [A, V] logits tensor, and what top-k
    sampling itself samples from (`sampling.sample_candidates`)."""

    ids: torch.Tensor
    logits: torch.Tensor


class StepHook(Protocol):
    """Called once per decode step, before sampling, with the live rows only.

    step: 0-based index of the token about to be sampled.
    hidden: float32 [A, D], the residual stream after the feature block at each row's last token
        (the last prompt token at step 0): the Q-probe feature of the completion so far.
    logits: float32 [A, V], the model's next-token logits (before temperature and top-p).
    rows: which (prompt, sample) each row is, and its tokens so far.
    Returns new logits [A, V] to sample from (e.g. -inf everywhere but a forced token),
    `Candidates` (sample only among these tokens, by these logits), or None to keep the model's.
    Temperature, top-k and top-p then apply as usual. Recorded log-probabilities stay those of
    the model's own logits.
    A hook may raise to abort the whole call: the exception leaves `sample` and nothing of the
    batch is kept.
    """

    def __call__(self, step: int, hidden: torch.Tensor, logits: torch.Tensor,
                 rows: LiveRows) -> torch.Tensor | Candidates | None: ...


class StepObserver(Protocol):
    """Called once per decode step, after sampling and the EOS / stop-string checks.

    step: 0-based index of the token just sampled.
    rows: the rows computed at this step; `rows.tokens` [A, step + 1] includes the new token.
    done: bool [A], the row ended at this step by EOS or a stop string (its last tokens are not
        all kept: the row's text is known only from the result). Rows that reach max_new_tokens
        are not `done` here: their last token is kept.
    It must not raise unless it means to abort the call (as a `StepHook` may).
    """

    def __call__(self, step: int, rows: LiveRows, done: np.ndarray) -> None: ...


@dataclass
class RowResult:
    """What the loop produced for one row (turned into `Sample` by the backend)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    feature: np.ndarray | None
    logprob_sum: float  # sum of log p(token) over token_ids, temperature 1, no top-p


@dataclass
class _Decoded:
    """The raw outcome of the steps, indexed by original row r = prompt * k + sample."""

    tokens: np.ndarray  # [B, n_steps] int64
    logp: np.ndarray  # [B, n_steps] float64, log p of each sampled token (model's own)
    feats: torch.Tensor | None  # [B, n_steps, D] float32 (CPU) when features are on
    finish: list[str]  # "stop" or "length"
    end_step: np.ndarray  # [B] EOS / stop step, or n_steps for length
    by_eos: np.ndarray  # [B] bool


@torch.no_grad()
def run_batch(
    dec,
    prompt_tokens: list[list[int]],
    seed_keys: list[str],
    k: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: list[str],
    seed: int,
    layer: int,
    position: str,
    features: bool,
    eos_ids: set[int],
    detok: Callable[[list[list[int]]], list[str]],
    hook: StepHook | None = None,
    prompt_offset: int = 0,
    top_k: int = 0,
    observe: StepObserver | None = None,
) -> list[list[RowResult]]:
    """Sample k completions for each tokenised prompt in one batch (P * k rows).

    dec: a FastDecoder or GenericDecoder. seed_keys name the prompts for seeding;
    detok(list of id lists) -> list of str. prompt_offset: index of this batch's first prompt in
    the caller's list (what `LiveRows.prompt` counts from).
    """
    logits_p, h_prompt, state, pos0 = _prefill(dec, prompt_tokens, k, layer)
    seeds = row_seeds(seed, seed_keys, k)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dec.device)
    out = _decode(dec, state, logits_p, h_prompt, pos0, seeds, len(prompt_tokens), k,
                  temperature=temperature, top_p=top_p, top_k=top_k, n_steps=int(max_new_tokens),
                  stop=stop,
                  layer=layer, features=features, eos=eos, detok=detok, hook=hook,
                  prompt_offset=prompt_offset, observe=observe)
    return _results(out, h_prompt.cpu() if features else None, len(prompt_tokens), k, stop,
                    position, detok)


def _prefill(dec, prompt_tokens: list[list[int]], k: int, layer: int):
    """Left-pad and prefill the prompts: (logits [P, V], residual after `layer` at the last
    prompt token [P, D], decoder state, position of completion token 0 of each row [B])."""
    dev = dec.device
    p = len(prompt_tokens)
    # Tokens all prompts start with run once (not the last one: its logits start sampling).
    n_sh = _common_prefix(prompt_tokens) if isinstance(dec, FastDecoder) and p > 1 else 0
    n_sh = n_sh if n_sh >= MIN_SHARED_PREFIX else 0
    prefix = torch.tensor(prompt_tokens[0][:n_sh], dtype=torch.long, device=dev) if n_sh else None
    prompt_tokens = [t[n_sh:] for t in prompt_tokens]
    t0 = max(len(t) for t in prompt_tokens)
    ids = torch.zeros(p, t0, dtype=torch.long)
    valid = torch.zeros(p, t0, dtype=torch.bool)
    for i, t in enumerate(prompt_tokens):  # left padding: every row's next slot is the same
        ids[i, t0 - len(t) :] = torch.tensor(t, dtype=torch.long)
        valid[i, t0 - len(t) :] = True
    ids, valid = ids.to(dev), valid.to(dev)
    if prefix is None:
        logits_p, h_prompt, state = dec.prefill(ids, valid, layer)  # [P, V], [P, D]
    else:
        logits_p, h_prompt, state = dec.prefill(ids, valid, layer, prefix)
    pos0 = (n_sh + valid.sum(-1)).repeat_interleave(k)  # [B]
    return logits_p, h_prompt, state, pos0


def _decode(dec, state, logits_p, h_prompt, pos0, seeds, p: int, k: int, *, temperature: float,
            top_p: float, top_k: int, n_steps: int, stop: list[str], layer: int, features: bool,
            eos: torch.Tensor, detok, hook: StepHook | None, prompt_offset: int,
            observe: StepObserver | None = None) -> _Decoded:
    """The steps: sample, record, drop finished rows, feed the rest.

    Kept whole: one step's order (hook, sample, log-prob, EOS/stop checks, compaction, forward)
    is the invariant the samples' bits depend on, and reads best in one place."""
    dev = dec.device
    b = p * k
    feats = torch.zeros(b, n_steps, dec.dim, dtype=torch.float32) if features else None
    tokens = np.zeros((b, n_steps), dtype=np.int64)
    logp = np.zeros((b, n_steps), dtype=np.float64)
    window = max((len(s.encode()) for s in stop), default=0) + 1

    live = np.arange(b)  # original row index of each computed (unfinished) row
    groups = np.arange(p)  # original prompt index of each live prompt group
    logits = logits_p.repeat_interleave(k, 0)  # [A, V]
    h = None  # residual after `layer` of the last step [A, D] (step 0: the prompt's)
    active = np.ones(b, dtype=bool)  # indexed by original row
    finish = [""] * b
    by_eos = np.zeros(b, dtype=bool)
    end_step = np.full(b, n_steps, dtype=np.int64)
    for s in range(n_steps):
        sample_from, cand = logits, None
        if hook is not None:
            hidden = h_prompt.repeat_interleave(k, 0) if h is None else h
            rows = LiveRows(prompt=prompt_offset + live // k, sample=live % k, tokens=tokens[live, :s])
            changed = hook(s, hidden.float(), logits, rows)
            if isinstance(changed, Candidates):
                if changed.ids.shape != changed.logits.shape or changed.ids.shape[0] != len(live):
                    raise ValueError(f"step hook returned candidates {tuple(changed.ids.shape)} / "
                                     f"{tuple(changed.logits.shape)} for {len(live)} rows")
                cand = changed
            elif changed is not None:
                if tuple(changed.shape) != tuple(logits.shape):
                    raise ValueError(f"step hook returned logits {tuple(changed.shape)}, "
                                     f"expected {tuple(logits.shape)}")
                sample_from = changed.to(logits.dtype)
        u = uniforms(seeds[live], s)
        if cand is not None:
            tok = sample_candidates(cand.ids, cand.logits.float(), temperature, top_p, u, top_k)
        else:
            tok = sample_tokens(sample_from, temperature, top_p, u, top_k)
        tokens[live, s] = tok.cpu().numpy()
        logp[live, s] = token_logprobs(logits, tok).double().cpu().numpy()
        is_eos = torch.isin(tok, eos).cpu().numpy() if eos.numel() else np.zeros(len(live), bool)
        for r in live[is_eos]:
            active[r], finish[r], end_step[r], by_eos[r] = False, "stop", s, True
        if stop:
            rest = live[~is_eos]
            texts = detok([tokens[r, max(0, s - window + 1) : s + 1].tolist() for r in rest])
            for r, t in zip(rest, texts):
                if any(st in t for st in stop):
                    active[r], finish[r], end_step[r] = False, "stop", s
        if observe is not None:
            observe(s, LiveRows(prompt=prompt_offset + live // k, sample=live % k,
                                tokens=tokens[live, : s + 1]), ~active[live])
        last = s == n_steps - 1
        if last:
            for r in live[active[live]]:
                active[r], finish[r] = False, "length"
        if last or not active.any():
            if features and last and any(finish[r] == "length" for r in live):
                _, h = dec.step(state, tok, pos0 + s, s, k, layer, n_steps, logits=False)
                feats[torch.from_numpy(live), s] = h.float().cpu()
            break
        # Drop finished rows (their token s is never fed: nothing after it is kept) and prompt
        # groups with no unfinished row left (their prompt cache is never read again).
        keep = active[live]
        if not keep.all():
            live = live[keep]
            group_live = np.isin(groups, live // k)
            keep_g = np.nonzero(group_live)[0]
            groups = groups[keep_g]
            slots = np.searchsorted(groups, live // k) * k + live % k
            keep_r = torch.from_numpy(np.nonzero(keep)[0]).to(dev)
            state = dec.select(state, torch.from_numpy(keep_g).to(dev), keep_r,
                               torch.from_numpy(slots).to(dev), s, k)
            pos0 = pos0.index_select(0, keep_r)
            tok = tok.index_select(0, keep_r)
        logits, h = dec.step(state, tok, pos0 + s, s, k, layer, n_steps)
        if features:
            feats[torch.from_numpy(live), s] = h.float().cpu()
    return _Decoded(tokens, logp, feats, finish, end_step, by_eos)


def _results(d: _Decoded, h_prompt: torch.Tensor | None, p: int, k: int, stop: list[str],
             position: str, detok) -> list[list[RowResult]]:
    """Cut each row at EOS / its stop string; its text, kept tokens, feature and log-prob sum."""
    return [[row_result(d.tokens[i * k + j], d.logp[i * k + j],
                        None if d.feats is None else d.feats[i * k + j],
                        None if h_prompt is None else h_prompt[i], d.finish[i * k + j],
                        int(d.end_step[i * k + j]), bool(d.by_eos[i * k + j]), stop, position,
                        detok)
             for j in range(k)] for i in range(p)]


def row_result(tokens: np.ndarray, logp: np.ndarray, feats: torch.Tensor | None,
               h_prompt: torch.Tensor | None, finish: str, end: int, by_eos: bool,
               stop: list[str], position: str, detok) -> RowResult:
    """One row's result: tokens [n_steps], logp [n_steps], feats [n_steps, D] (or None) as the
    steps left them; cut at EOS (step `end`) or before its stop string."""
    n_steps = len(tokens)
    if finish == "length":
        n, text = n_steps, None
    elif by_eos:  # EOS sampled at step `end`: tokens 0..end-1 kept
        n, text = end, None
    else:  # a stop string ends in token `end`
        n, text = _cut_at_stop(tokens[: end + 1].tolist(), stop, detok)
    ids = tokens[:n].tolist()
    if text is None:
        text = detok([ids])[0]
    feat = None
    if feats is not None:
        if n == 0:
            feat = h_prompt
        elif position == "mean":
            feat = feats[:n].mean(0)
        else:
            feat = feats[n - 1]
        feat = feat.numpy().copy()
    return RowResult(text, ids, finish, feat, float(logp[:n].sum()))


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all sequences share, leaving each at least one token."""
    n = min(len(t) for t in seqs) - 1
    first = seqs[0]
    for t in seqs[1:]:
        i = 0
        while i < n and t[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


def _cut_at_stop(ids: list[int], stop: list[str], detok) -> tuple[int, str]:
    """Cut before the first stop string: (number of tokens fully kept, kept text)."""
    full = detok([ids])[0]
    cut = min(i for i in (full.find(st) for st in stop) if i >= 0)
    text = full[:cut]
    n = len(ids) - 1  # the last token holds the end of the stop string
    while n > 0 and len(detok([ids[:n]])[0]) > cut:
        n -= 1
    return n, text
