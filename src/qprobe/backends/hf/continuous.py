"""Continuous batching in the local decode loop: prompts join a running decode at its next step,
and a row that ends leaves at once, its prompt's result handed out as soon as its k rows are done.

`run_continuous` is the loop of `loop._decode` with the batch open at both ends. Before every
step it asks `admit()` for new prompts (tokenised, each with its own seed); they are prefilled
and merged into the running state (`FastDecoder.merge`: their prompt caches beside the running
ones, their rows at step 0 while the others are further on; each row attends to its own
generated tokens, `FastDecoder.step` with per-row steps). Sampling is counter-based per (seed,
prompt text, sample index, the row's own step), so a prompt gets exactly the samples it would get
alone whenever it joins (up to floating-point sums over other batch shapes, as any batching). No
decode step is ever thrown away.

Only for `FastDecoder` (Llama-family models) and without a step hook; no shared-prefix cache
(prompts that join could not share it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qprobe.backends.hf.loop import LiveRows, RowResult, StepObserver, row_result
from qprobe.backends.hf.sampling import row_seeds, sample_tokens, token_logprobs, uniforms


@dataclass
class Joiner:
    """A prompt to admit: its token ids, its text (the seed key), its seed and a caller's tag."""

    tokens: list[int]
    key: str
    seed: int
    tag: Any


@torch.no_grad()
def run_continuous(dec, k: int, *, temperature: float, top_p: float, top_k: int,
                   max_new_tokens: int, stop: list[str], layer: int, position: str,
                   features: bool, eos_ids: set[int], detok: Callable[[list[list[int]]], list[str]],
                   admit: Callable[[], list[Joiner]],
                   deliver: Callable[[Any, list[RowResult]], None],
                   observe: StepObserver | None = None,
                   drop: Callable[[Any], bool] | None = None) -> dict[str, int]:
    """Decode until no row is left and `admit` brings nothing; returns counters (steps, joined:
    prompts admitted after the first step, dropped: prompts taken out by `drop`).
    deliver(tag, k RowResults) is called for each prompt when its k rows have ended. observe: as
    in `loop.run_batch`, with `rows.prompt` the order in which prompts were admitted and
    `rows.tokens` each row's own tokens so far (ragged). drop(tag), asked of every running
    prompt after each `admit`: True takes its rows out before the next step, and it is never
    delivered (a request nobody waits for any more)."""
    dev = dec.device
    n_steps = int(max_new_tokens)
    window = max((len(s.encode()) for s in stop), default=0) + 1
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
    state: dict | None = None
    # Aligned with the computed rows (the decoder state's row order):
    rid = np.zeros(0, np.int64)  # global row id
    grp = np.zeros(0, np.int64)  # global prompt id
    samp = np.zeros(0, np.int64)  # sample index j
    steps = np.zeros(0, np.int64)  # the row's own step (index of the token it samples now)
    seeds = np.zeros(0, np.uint64)
    pos0 = torch.zeros(0, dtype=torch.long, device=dev)
    logits: torch.Tensor | None = None  # [A, V] next-token logits of each row
    groups = np.zeros(0, np.int64)  # global prompt id of each prompt cache in the state
    # Per global row / prompt:
    toks: dict[int, np.ndarray] = {}
    lps: dict[int, np.ndarray] = {}
    feats: dict[int, torch.Tensor] = {}
    fin: dict[int, tuple[str, int, bool]] = {}  # finish, end step, by EOS
    prompts: dict[int, tuple[Any, list[int], torch.Tensor | None]] = {}  # tag, rows, h_prompt
    next_g = 0
    done_steps = joined = dropped = 0

    def keep(mask: np.ndarray) -> None:
        nonlocal state, rid, grp, samp, steps, seeds, pos0, logits, groups
        if mask.all():
            return
        idx = np.nonzero(mask)[0]
        if not len(idx):  # nothing runs: the next prompts start a fresh state
            state, logits = None, None
            rid, grp, samp, steps, seeds = (x[:0] for x in (rid, grp, samp, steps, seeds))
            groups, pos0 = groups[:0], pos0[:0]
            return
        rid, grp, samp, steps, seeds = rid[idx], grp[idx], samp[idx], steps[idx], seeds[idx]
        keep_g = np.nonzero(np.isin(groups, grp))[0]
        groups = groups[keep_g]
        slots = np.searchsorted(groups, grp) * k + samp
        t_idx = torch.from_numpy(idx).to(dev)
        state = dec.select(state, torch.from_numpy(keep_g).to(dev), t_idx,
                           torch.from_numpy(slots).to(dev), n_steps, k)
        pos0 = pos0.index_select(0, t_idx)
        if logits is not None:
            logits = logits.index_select(0, t_idx)

    while True:
        new = admit()
        if new:
            if done_steps:
                joined += len(new)
            t0 = max(len(j.tokens) for j in new)
            ids = torch.zeros(len(new), t0, dtype=torch.long)
            valid = torch.zeros(len(new), t0, dtype=torch.bool)
            for i, j in enumerate(new):  # left padding, as the loop's prefill
                ids[i, t0 - len(j.tokens):] = torch.tensor(j.tokens, dtype=torch.long)
                valid[i, t0 - len(j.tokens):] = True
            ids, valid = ids.to(dev), valid.to(dev)
            lg, h_p, st = dec.prefill(ids, valid, layer)  # [P2, V], [P2, D]
            state = st if state is None else dec.merge(state, st, k)
            gids = np.arange(next_g, next_g + len(new), dtype=np.int64)
            next_g += len(new)
            groups = np.concatenate([groups, gids])
            rows = np.array([g * k + j for g in gids for j in range(k)], dtype=np.int64)
            rid = np.concatenate([rid, rows])
            grp = np.concatenate([grp, np.repeat(gids, k)])
            samp = np.concatenate([samp, np.tile(np.arange(k, dtype=np.int64), len(new))])
            steps = np.concatenate([steps, np.zeros(len(rows), np.int64)])
            seeds = np.concatenate([seeds] + [row_seeds(j.seed, [j.key], k) for j in new])
            pos0 = torch.cat([pos0, valid.sum(-1).repeat_interleave(k)])
            new_logits = lg.repeat_interleave(k, 0)
            logits = new_logits if logits is None else torch.cat([logits, new_logits])
            for i, (g, j) in enumerate(zip(gids, new)):
                prompts[int(g)] = (j.tag, [int(g) * k + s for s in range(k)],
                                   h_p[i].float().cpu() if features else None)
            for r in rows:
                toks[int(r)] = np.zeros(n_steps, np.int64)
                lps[int(r)] = np.zeros(n_steps, np.float64)
                if features:
                    feats[int(r)] = torch.zeros(n_steps, dec.dim, dtype=torch.float32)
        if drop is not None and prompts:
            off = [g for g, (tag, _, _) in prompts.items() if drop(tag)]
            if off:
                keep(~np.isin(grp, off))
                for g in off:
                    for r in prompts.pop(g)[1]:
                        for store in (toks, lps, feats, fin):
                            store.pop(r, None)
                dropped += len(off)
        if not len(rid):
            break
        a = len(rid)
        tok = sample_tokens(logits, temperature, top_p, uniforms(seeds, steps), top_k)
        tok_np = tok.cpu().numpy()
        lp_np = token_logprobs(logits, tok).double().cpu().numpy()
        for i in range(a):
            toks[int(rid[i])][steps[i]] = tok_np[i]
            lps[int(rid[i])][steps[i]] = lp_np[i]
        ended = torch.isin(tok, eos).cpu().numpy() if eos.numel() else np.zeros(a, bool)
        for i in np.nonzero(ended)[0]:
            fin[int(rid[i])] = ("stop", int(steps[i]), True)
        if stop:
            rest = np.nonzero(~ended)[0]
            texts = detok([toks[int(rid[i])][max(0, steps[i] - window + 1): steps[i] + 1].tolist()
                           for i in rest])
            for i, t in zip(rest, texts):
                if any(s in t for s in stop):
                    ended[i] = True
                    fin[int(rid[i])] = ("stop", int(steps[i]), False)
        if observe is not None:
            observe(done_steps, LiveRows(prompt=grp.copy(), sample=samp.copy(),
                                         tokens=[toks[int(r)][: s + 1] for r, s in zip(rid, steps)]),
                    ended.copy())
        at_len = (steps == n_steps - 1) & ~ended
        for i in np.nonzero(at_len)[0]:
            fin[int(rid[i])] = ("length", n_steps, False)
        # Feed the rows that go on (and, for their last feature, those that reached the length).
        feed = ~ended if features else ~ended & ~at_len
        gone = rid[~feed].tolist()
        keep(feed)
        tok = tok.index_select(0, torch.from_numpy(np.nonzero(feed)[0]).to(dev))
        if len(rid):
            st_t = torch.from_numpy(steps).to(dev)
            # Rows all at one step (no one joined late): the decoder's plain path, no mask.
            s_arg = int(steps[0]) if (steps == steps[0]).all() else st_t
            # Rows all at their last step are fed for their feature only: up to `layer`.
            need = not (steps == n_steps - 1).all()
            logits, h = dec.step(state, tok, pos0 + st_t, s_arg, k, layer, n_steps, logits=need)
            if features:
                h_cpu = h.float().cpu()
                for i in range(len(rid)):
                    feats[int(rid[i])][steps[i]] = h_cpu[i]
            last = steps == n_steps - 1
            if last.any():
                gone += rid[last].tolist()
                keep(~last)
        steps = steps + 1
        done_steps += 1
        # Hand out every prompt whose k rows have all ended.
        for g in sorted({r // k for r in gone}):
            tag, rows_g, h_prompt = prompts[g]
            if all(r in fin for r in rows_g):
                deliver(tag, [row_result(toks.pop(r), lps.pop(r), feats.pop(r, None), h_prompt,
                                         *fin.pop(r), stop, position, detok) for r in rows_g])
                del prompts[g]
    return {"steps": done_steps, "joined": joined, "dropped": dropped}
