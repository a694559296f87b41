"""ONE collection loop: plan (what is not stored) -> sample -> score -> append a shard.

`collect_task` serves every collection: `qprobe collect` (through `collect.run.collect`, which turns
a `CollectConfig` into a task, a model and a `Draw`), an experiment's train and test sets, its
greedy baseline (k = 1, temperature 0) and its few-shot baseline (a prefix put before each
prompt, scored against the original prompt). The Ray executor (`collect.ray`) plans with the same
`plan` and runs the same `BatchWork` in its actors.

What each prompt gets is a `Draw`:
- a sampling task: k samples (sample_idx 0..k-1), their features and the task's rewards;
- a preference task's pair: both answers embedded by the model (sample_idx 0 = chosen,
  1 = rejected, column `role`; exact tokens through `backends.hf.encode.GroupEncoder`, the
  feature the folder's `FeatureSpec` names, the answer's log-likelihood and its token ids) and,
  with k > 0, k samples of the prompt beside them (sample_idx 2..k+1, role "sample"; the `dpo`
  objective needs them), rewards left empty. `pairs.parquet` lists (prompt_id, chosen 0,
  rejected 1) for every prompt whose two rows are stored; it is rewritten after each shard.

One shard per batch of prompts, written atomically by `RolloutWriter`; re-running the same
collection resumes (prompts whose keys are all stored are skipped), and a run with other
settings is refused by the writer (meta identity). Progress goes to stderr (tqdm).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.backends.base import LanguageModel, Sample, SamplingParams
from qprobe.errors import QProbeError

ROLES = ("chosen", "rejected")  # sample_idx 0 and 1 of a preference pair


@dataclass(frozen=True)
class Draw:
    """What a collection draws for each prompt: k samples (`pairs` False), or a preference pair's
    two answers embedded and k samples beside them (`pairs` True, k >= 0; params needed if k).

    prefix: text put before each prompt when sampling (the few-shot baseline); the rows, the
    reward and the stored `prompt` keep the original prompt."""

    k: int
    params: SamplingParams | None
    prefix: str = ""
    pairs: bool = False

    def __post_init__(self) -> None:
        if self.k < (0 if self.pairs else 1):
            raise QProbeError(f"collect: k must be >= {0 if self.pairs else 1}"
                              + (" for preference pairs" if self.pairs else "") + f", got {self.k}")
        if self.k and self.params is None:
            raise QProbeError("collect: sampling parameters are needed for k > 0")
        if self.pairs and self.prefix:
            raise QProbeError("collect: a prefix is for sampled prompts, not preference pairs")

    @property
    def keys(self) -> range:
        """The sample_idx values each prompt gets."""
        return range(2 + self.k) if self.pairs else range(self.k)

    def rows(self, task, split: str, limit: int | None) -> list[dict]:
        """The prompts to collect, each with "id" and "prompt" (a pair also "chosen", "rejected";
        a sampled prompt the task's other columns, given to its reward)."""
        if not self.pairs:
            return task.prompts(split, limit=limit)
        return [{"id": p["prompt_id"], **p} for p in task.pairs(split, limit)]

    def meta(self, model: str, task, split: str, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        """The identity of a collection (meta.json): a resume with another identity is refused."""
        if self.pairs:
            return {"model": model, "task": task.name, "split": split, "kind": "preferences",
                    "k": self.k, **({"sampling": self.params.to_dict()} if self.k else {}),
                    **(extra or {})}
        return rollouts_meta(model, task, split, self.k, self.params, self.prefix, extra)

    def per_batch(self, max_batch_rows: int) -> int:
        """Prompts per batch and shard when the caller does not say: the model's rows at once
        // k (pairs without samples: 16, one forward per pair)."""
        return max(1, max_batch_rows // self.k) if self.k else 16


def plan(rows: list[dict], keys: range, done: set[tuple[str, int]], per_batch: int
         ) -> list[list[dict]]:
    """The batches still to collect: `rows` cut every `per_batch` prompts, each batch keeping the
    prompts whose keys are not all in `done`. Cutting the full list (not the remaining prompts)
    keeps a resumed batch the shape it had in the first run."""
    out = []
    for i in range(0, len(rows), per_batch):
        todo = [r for r in rows[i : i + per_batch]
                if not all((str(r["id"]), j) in done for j in keys)]
        if todo:
            out.append(todo)
    return out


class BatchWork:
    """The batch work of one collection, where the model is: every executor (this process, a Ray
    actor) runs exactly this."""

    def __init__(self, lm: LanguageModel, task, draw: Draw) -> None:
        self.lm, self.task, self.draw = lm, task, draw
        self.enc = PairEncoder(lm) if draw.pairs else None

    def __call__(self, todo: list[dict], done: set[tuple[str, int]]
                 ) -> tuple[list[dict], np.ndarray | None, int]:
        """Rows, features [rows, dim] (None without a feature spec) and tokens of one batch;
        keys in `done` are left out."""
        if self.draw.pairs:
            rows, feats, n_tokens = self._pairs(todo)
        else:
            rows, feats, n_tokens = [], [], 0
        if self.draw.k:
            start = 2 if self.draw.pairs else 0
            d = self.draw
            groups = self.lm.sample([d.prefix + r["prompt"] for r in todo], d.k, d.params)
            for r, group in zip(todo, groups):
                for j, s in enumerate(group):
                    rows.append({**_row(str(r["id"]), start + j, r["prompt"], s),
                                 **({"role": "sample"} if d.pairs else {})})
                    feats.append(s.feature)
                    n_tokens += s.num_tokens or 0
        keep = [i for i, o in enumerate(rows) if (o["prompt_id"], o["sample_idx"]) not in done]
        rows = [rows[i] for i in keep]
        if not rows:
            return [], None, n_tokens
        if not self.draw.pairs:
            self._score(todo, rows)
        features = (np.stack([feats[i] for i in keep])
                    if self.lm.feature_spec is not None else None)
        return rows, features, n_tokens

    def _pairs(self, todo: list[dict]) -> tuple[list[dict], list, int]:
        rows, feats, n_tokens = [], [], 0
        for r in todo:
            e = self.enc.encode(r["prompt"], [r["chosen"], r["rejected"]])
            for j, role in enumerate(ROLES):
                ids = None if e["token_ids"] is None else e["token_ids"][j]
                rows.append({
                    "prompt_id": str(r["id"]), "sample_idx": j, "prompt": r["prompt"],
                    "completion": r[role], "reward": None, "finish_reason": None,
                    "num_tokens": None if ids is None else len(ids),
                    "logprob_sum": None if e["logprob_sum"] is None else e["logprob_sum"][j],
                    "token_ids": ids, "role": role})
                n_tokens += len(ids or [])
                feats.append(None if e["features"] is None else e["features"][j])
        return rows, feats, n_tokens

    def _score(self, todo: list[dict], rows: list[dict]) -> None:
        """The task's rewards of sampled rows, with the prompts' other columns."""
        by_id = {str(r["id"]): r for r in todo}
        columns = {c: [by_id[o["prompt_id"]].get(c) for o in rows]
                   for c in todo[0] if c not in ("id", "prompt")}
        columns["prompt_id"] = [o["prompt_id"] for o in rows]
        rewards = self.task.reward([o["prompt"] for o in rows], [o["completion"] for o in rows],
                                   **columns)
        for o, rw in zip(rows, rewards):
            o["reward"] = None if rw is None else float(rw)


class PairEncoder:
    """Features, log-likelihoods and token ids of given answers after a prompt.

    A local model (`HFLanguageModel`) runs one forward per prompt with its answers batched after
    the shared prompt cache (the prompt as the sampler sends it, each answer tokenised on its own,
    as `qprobe embed` re-encodes a stored completion), so a probe trained on these rows scores
    sampled completions of the same model on the same scale; a backend that only embeds text
    (an API model with an embedder) gives features and no log-likelihoods."""

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


def collect_task(lm: LanguageModel, task, split: str, out: str | Path, *, k: int,
                 params: SamplingParams | None, limit: int | None = None, prefix: str = "",
                 pairs: bool = False, batch_prompts: int | None = None,
                 meta_extra: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                 progress: bool = True, say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """k samples of `lm` per prompt of `task`/`split` (the first `limit`) into the rollouts
    folder `out`, scored by the task; creates or resumes it. Returns the summary.

    pairs: a preference task's pairs instead (both answers embedded, k samples beside; see the
        module doc); the summary then has "pairs".
    prefix: text put before each prompt (the few-shot baseline); the rows, the reward and the
        stored `prompt` keep the original prompt; a non-empty prefix is part of the meta identity.
    batch_prompts: prompts per batch and shard (default: `Draw.per_batch`).
    meta_extra: more identity keys for meta.json, overriding the defaults (model, task = the
        task's name, split, k, sampling, prefix).
    settings: recorded as the summary's "config" (e.g. the CollectConfig).
    say: called with one line when done (what was collected, or that nothing was left to do).
    """
    from qprobe.rollouts import RolloutWriter

    draw = Draw(k, params, prefix, pairs)
    rows = draw.rows(task, split, limit)
    if not rows:
        raise QProbeError(f"collect: task {task.name} split {split} has no "
                          + ("pairs" if pairs else "prompts"))
    writer = RolloutWriter(out, meta=draw.meta(lm.name, task, split, meta_extra),
                           feature_spec=lm.feature_spec)
    per_batch = batch_prompts or draw.per_batch(lm.max_batch_rows)
    n_new, n_tokens, seconds = _run(BatchWork(lm, task, draw), writer, rows, per_batch, progress)
    summary = summarize(writer, draw, rows, seconds, n_new, n_tokens, settings)
    if n_new:  # a resume with nothing left to do keeps the summary of the run that wrote rows
        writer.update_meta(summary=summary)
    if say is not None:
        name = Path(out).name
        say(f"{name}: {len(rows)} prompts x {k} already collected" if not n_new else
            f"{name}: {n_new} new samples in {seconds:.0f}s, mean reward "
            + ("n/a" if summary["mean_reward"] is None else f"{summary['mean_reward']:.3f}"))
    return summary


def rollouts_meta(model: str, task, split: str, k: int, params: SamplingParams, prefix: str = "",
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a sampled collection (meta.json)."""
    return {"model": model, "task": task.name, "split": split, "k": k,
            "sampling": params.to_dict(), **({"prefix": prefix} if prefix else {}),
            **(extra or {})}


def _run(work: BatchWork, writer, rows: list[dict], per_batch: int, progress: bool
         ) -> tuple[int, int, float]:
    """Collect and append batch by batch; returns (new rows, their tokens, seconds)."""
    from tqdm import tqdm

    keys = work.draw.keys

    def complete(r: dict) -> bool:
        return all((str(r["id"]), j) in writer.done for j in keys)

    n_done = sum(complete(r) for r in rows)
    bar = tqdm(total=len(rows), initial=n_done, unit="prompt", file=sys.stderr,
               disable=not progress, desc="collect pairs" if work.draw.pairs else "collect",
               dynamic_ncols=True)
    t_start = time.time()
    n_tokens = n_rows = 0
    for i in range(0, len(rows), per_batch):
        # Planned batch by batch: another writer on the folder may have stored some meanwhile.
        todo = [r for r in rows[i : i + per_batch] if not complete(r)]
        if not todo:
            continue
        out_rows, features, tokens = work(todo, writer.done)
        n_tokens += tokens
        # Another writer on the same folder may have stored some of these meanwhile: keep theirs.
        n_rows += writer.append(out_rows, features, skip_stored=True)
        if work.draw.pairs:
            write_pairs(writer, rows)
        bar.update(len(todo))
        dt = max(time.time() - t_start, 1e-9)
        bar.set_postfix_str(f"{n_tokens / dt:.0f} tok/s", refresh=False)
    bar.close()
    if work.draw.pairs:
        write_pairs(writer, rows)
    return n_rows, n_tokens, time.time() - t_start


def _row(prompt_id: str, j: int, prompt: str, s: Sample) -> dict[str, Any]:
    """One sampled row. num_tokens, logprob_sum and token_ids are null where the backend does
    not know them (an API returns text; token ids only when they are the model's own)."""
    known_ids = s.num_tokens is not None and len(s.token_ids) == s.num_tokens
    return {
        "prompt_id": prompt_id, "sample_idx": j, "prompt": prompt, "completion": s.text,
        "reward": None, "finish_reason": s.finish_reason, "num_tokens": s.num_tokens,
        "logprob_sum": s.logprob_sum, "token_ids": s.token_ids if known_ids else None,
    }


def write_pairs(writer, rows: list[dict]) -> None:
    """pairs.parquet for every pair whose two rows are stored (by any writer), in task order."""
    done = writer.done
    pairs = [{"prompt_id": str(r["id"]), "chosen": 0, "rejected": 1} for r in rows
             if (str(r["id"]), 0) in done and (str(r["id"]), 1) in done]
    if pairs:
        writer.write_pairs(pairs)


def summarize(writer, draw: Draw, rows: list[dict], seconds: float, n_new: int, n_tokens: int,
              settings: dict[str, Any] | None) -> dict[str, Any]:
    """The summary of a run (returned, and kept in meta.json when it wrote rows)."""
    from qprobe.rollouts import Rollouts

    r = Rollouts(writer.path)
    rewards = r.rewards
    scored = np.isfinite(rewards)
    summary = {
        "prompts": len(rows),
        "stored_prompts": len(r.groups()[1]),  # in the folder: earlier runs' too
        "rows": len(r),
        "new_rows": n_new,
        "scored": int(scored.sum()),
        "mean_reward": float(rewards[scored].mean()) if scored.any() else None,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
    }
    if draw.pairs:
        stored = writer.done
        summary["pairs"] = sum((str(x["id"]), 0) in stored and (str(x["id"]), 1) in stored
                               for x in rows)
    if settings is not None:
        summary["config"] = settings
    return summary
