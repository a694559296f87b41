"""Quality of generated continuations, as the controlled-generation papers report it.

- `distinct_n`: diversity, DExperts/RAD style: for each prompt, unique n-grams over all n-grams
  of its continuations (whitespace tokens), averaged over prompts.
- `perplexity`: fluency, the continuation's perplexity under a fixed *scoring* model given the
  prompt (never the generator itself, which would reward its own habits): per continuation
  exp(-mean token log-prob); reported as the mean over continuations (the papers' number) and
  the corpus value exp(-total log-prob / total tokens). Continuations the scoring model tokenises
  to nothing are counted in `empty` and left out of both numbers, never silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def distinct_n(groups: Sequence[Sequence[str]], n: int) -> float:
    """Mean over prompts of (distinct n-grams / n-grams) among that prompt's continuations."""
    vals = []
    for texts in groups:
        grams: list[tuple[str, ...]] = []
        for t in texts:
            w = t.split()
            grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        if grams:
            vals.append(len(set(grams)) / len(grams))
    return float(np.mean(vals)) if vals else float("nan")


def perplexity(model_bundle: tuple, prompts: Sequence[str], completions: Sequence[str]
               ) -> dict[str, Any]:
    """Perplexity of each completion given its prompt under model_bundle = (transformers
    model, tokenizer, identity); prompts are plain text (no chat template).

    Returns {"mean", "median", "corpus", "n", "empty", "model", "per_sample" [N] (nan where
    empty)}."""
    from qprobe.backends.hf.encode import GroupEncoder
    from qprobe.backends.hf.generic import decoder_blocks
    from qprobe.backends.hf.tokenizer import pad_id

    hf, tok, identity = model_bundle
    enc = GroupEncoder(hf, [], decoder_blocks(hf))
    pad = pad_id(tok)
    order: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(p, []).append(i)
    lp = np.full(len(prompts), np.nan)
    nt = np.zeros(len(prompts), dtype=np.int64)
    for p, rows in order.items():
        p_ids = list(tok(p)["input_ids"])
        if not p_ids and tok.bos_token_id is not None:
            p_ids = [tok.bos_token_id]
        comps = [list(tok(completions[i], add_special_tokens=False)["input_ids"]) for i in rows]
        keep = [j for j, c in enumerate(comps) if c]
        if keep:
            s, n, _ = enc.encode(p_ids, [comps[j] for j in keep], pad)
            for j, a, b in zip(keep, s, n):
                lp[rows[j]], nt[rows[j]] = a, b
    ok = nt > 0
    per = np.full(len(prompts), np.nan)
    per[ok] = np.exp(-lp[ok] / nt[ok])
    return {"mean": float(per[ok].mean()) if ok.any() else float("nan"),
            "median": float(np.median(per[ok])) if ok.any() else float("nan"),
            "corpus": float(np.exp(-lp[ok].sum() / nt[ok].sum())) if ok.any() else float("nan"),
            "n": int(ok.sum()), "empty": int((~ok).sum()), "model": identity,
            "per_sample": per}
