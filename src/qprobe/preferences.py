"""Preference rollouts: both answers of each pair embedded with the model, plus `pairs.parquet`.

`qprobe collect --task hh-harmless --split train` (or a pair file) lands here instead of sampling.
For each pair the model reads prompt + chosen and prompt + rejected as exact tokens (the prompt as
the sampler would send it, the answer tokenised on its own, as `qprobe embed` re-encodes a stored
completion) in one forward pass that shares the prompt's KV cache (`backends.hf.encode.GroupEncoder`), and
stores the feature the folder's `FeatureSpec` names, the answer's log-likelihood and its token ids.
So a probe trained on these rows scores sampled completions of the same model on the same scale.

Rows: sample_idx 0 = chosen, 1 = rejected (column `role`), and with k > 0 the model's own k
samples of the prompt at sample_idx 2 .. k+1 (role "sample"): the `dpo` objective needs them to
estimate the best-of-k policy's normaliser; `bt` needs only the pair. Rewards stay empty.
`pairs.parquet` lists (prompt_id, chosen 0, rejected 1) for every prompt whose two rows are
stored; it is rewritten after each shard, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.backends.base import LanguageModel, SamplingParams
from qprobe.errors import QProbeError

ROLES = ("chosen", "rejected")


class PairEncoder:
    """Features, log-likelihoods and token ids of given answers after a prompt.

    A local model (`HFLanguageModel`) runs one forward per prompt with its answers batched after
    the shared prompt cache; a backend that only embeds text (an API model with an embedder) gives
    features and no log-likelihoods."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.spec = lm.feature_spec
        self._enc = None
        if hasattr(lm, "tok") and hasattr(lm, "model") and hasattr(lm, "layer"):
            from qprobe.backends.hf.encode import GroupEncoder
            from qprobe.backends.hf.generic import decoder_blocks
            from qprobe.backends.hf.tokenizer import pad_id

            self._enc = GroupEncoder(lm.model, [lm.layer], decoder_blocks(lm.model))
            self._pad = pad_id(lm.tok.tokenizer)
        elif self.spec is not None and not hasattr(lm, "embed"):
            raise QProbeError(f"collect: {type(lm).__name__} cannot embed given answers")

    def encode(self, prompt: str, answers: list[str]) -> dict[str, Any]:
        """{"features": [n, D] float32 or None, "logprob_sum": [n] or None, "token_ids": lists
        or None}."""
        n = len(answers)
        if self._enc is not None:
            tok = self.lm.tok
            ids = [tok.completion_ids(a) for a in answers]
            lp, _, f = self._enc.encode(tok.prompt_ids(prompt), ids, self._pad)
            feats = f[self.lm.layer][self.lm.position] if self.spec is not None else None
            return {"features": feats, "logprob_sum": [float(x) for x in lp], "token_ids": ids}
        feats = self.lm.embed([prompt] * n, answers) if self.spec is not None else None
        return {"features": feats, "logprob_sum": None, "token_ids": None}


def collect_pairs(lm: LanguageModel, task, split: str, out: str | Path, *, k: int = 0,
                  params: SamplingParams | None = None, limit: int | None = None,
                  batch_prompts: int | None = None, meta_extra: dict[str, Any] | None = None,
                  settings: dict[str, Any] | None = None, progress: bool = True
                  ) -> dict[str, Any]:
    """Embed the pairs of `task`/`split` (the first `limit`) into the rollouts folder `out`
    (created or resumed), with k samples of the model per prompt beside each pair (k = 0: none).
    Returns the summary (the keys `collect` returns, plus "pairs")."""
    from tqdm import tqdm

    from qprobe.collect import _row
    from qprobe.rollouts import RolloutWriter

    if k < 0:
        raise QProbeError(f"collect: k must be >= 0 for preference pairs, got {k}")
    if k and params is None:
        raise QProbeError("collect: sampling parameters are needed for k > 0")
    rows = task.pairs(split, limit)
    if not rows:
        raise QProbeError(f"collect: task {task.name} split {split} has no pairs")
    meta = {"model": lm.name, "task": task.name, "split": split, "kind": "preferences", "k": k,
            **({"sampling": params.to_dict()} if k else {}), **(meta_extra or {})}
    writer = RolloutWriter(out, meta=meta, feature_spec=lm.feature_spec)
    enc = PairEncoder(lm)
    keys = range(2 + k)
    per_batch = batch_prompts or (max(1, lm.max_batch_rows // k) if k else 16)
    bar = tqdm(total=len(rows), unit="prompt", file=sys.stderr, disable=not progress,
               desc="collect pairs", dynamic_ncols=True)
    t0, n_new, n_tokens = time.time(), 0, 0
    for i in range(0, len(rows), per_batch):
        done = writer.done
        todo = [r for r in rows[i : i + per_batch]
                if not all((r["prompt_id"], j) in done for j in keys)]
        if todo:
            out_rows, feats = [], []
            for r in todo:
                e = enc.encode(r["prompt"], [r["chosen"], r["rejected"]])
                for j, role in enumerate(ROLES):
                    ids = None if e["token_ids"] is None else e["token_ids"][j]
                    out_rows.append({
                        "prompt_id": r["prompt_id"], "sample_idx": j, "prompt": r["prompt"],
                        "completion": r[role], "reward": None, "finish_reason": None,
                        "num_tokens": None if ids is None else len(ids),
                        "logprob_sum": None if e["logprob_sum"] is None else e["logprob_sum"][j],
                        "token_ids": ids, "role": role})
                    n_tokens += len(ids or [])
                    if e["features"] is not None:
                        feats.append(e["features"][j])
            if k:
                groups = lm.sample([r["prompt"] for r in todo], k, params)
                for r, group in zip(todo, groups):
                    for j, s in enumerate(group):
                        out_rows.append({**_row(r["prompt_id"], 2 + j, r["prompt"], s),
                                         "role": "sample"})
                        n_tokens += s.num_tokens or 0
                        if s.feature is not None:
                            feats.append(s.feature)
            features = np.stack(feats) if lm.feature_spec is not None else None
            n_new += writer.append(out_rows, features, skip_stored=True)
            _write_pairs(writer, rows)
        bar.update(len(rows[i : i + per_batch]))
    bar.close()
    _write_pairs(writer, rows)
    seconds = time.time() - t0
    stored = writer.done
    summary = {"prompts": len(rows), "rows": len(stored), "new_rows": n_new,
               "pairs": sum((r["prompt_id"], 0) in stored and (r["prompt_id"], 1) in stored
                            for r in rows),
               "scored": 0, "mean_reward": None, "seconds": round(seconds, 2),
               "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None}
    if settings is not None:
        summary["config"] = settings
    if n_new:
        writer.update_meta(summary=summary)
    return summary


def _write_pairs(writer, rows: list[dict]) -> None:
    """pairs.parquet for every pair whose two rows are stored (by any writer), in task order."""
    done = writer.done
    pairs = [{"prompt_id": r["prompt_id"], "chosen": 0, "rejected": 1} for r in rows
             if (r["prompt_id"], 0) in done and (r["prompt_id"], 1) in done]
    if pairs:
        writer.write_pairs(pairs)
