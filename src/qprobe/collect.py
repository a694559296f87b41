"""Collect rollouts: k completions per prompt, their features and rewards, into a rollouts folder.

One loop, `collect_task`, serves every collection: `qprobe collect` (through `collect`, which
turns a `CollectConfig` into a task, a model and sampling parameters), an experiment's train and
test sets, its greedy baseline (k = 1, temperature 0) and its few-shot baseline (a prefix put
before each prompt, scored against the original prompt).

One shard per batch of prompts, written atomically by `RolloutWriter`; re-running the same
collection resumes (prompts whose k samples are all stored are skipped), and a run with other
settings is refused by the writer (meta identity). Progress goes to stderr (tqdm).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe import defaults
from qprobe.backends.base import LanguageModel, Sample, SamplingParams
from qprobe.errors import QProbeError


@dataclass
class CollectConfig:
    """What `qprobe collect` does (every field is a command line flag)."""

    out: str = field(metadata={"help": "Rollouts folder to create or resume."})
    task: str = field(default="mbpp", metadata={"help": "Task name, or a .jsonl of {id, prompt} rows."})
    split: str | None = field(default=None, metadata={"help": "Task split (default: the only one)."})
    model: str | None = field(default=None, metadata={"help": "Model (default: embedded SmolLM2)."})
    backend: str | None = field(
        default=None, metadata={"help": "Backend: hf or openai (default: openai for an http(s):// "
                                "--model, else hf)."}
    )
    k: int | None = field(default=None, metadata={
        "help": "Samples per prompt (default 16; for preference pairs 0: the model's samples "
                "beside each pair, which the dpo objective needs)."})
    layer: int | None = field(default=None, metadata={"help": "Feature layer (negative: from top)."})
    position: str = field(default="last", metadata={"help": "Feature position: last or mean."})
    feature_dtype: str = field(default="float16", metadata={"help": "Stored feature dtype."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    max_new_tokens: int = field(default=defaults.MAX_NEW_TOKENS,
                                metadata={"help": "Tokens per completion at most."})
    temperature: float = field(default=defaults.TEMPERATURE,
                               metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=defaults.TOP_P, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed; each (prompt, sample) is seeded."})
    batch_prompts: int | None = field(
        default=None, metadata={"help": "Prompts per batch and shard (default: the model's rows at once // k, >= 1; 128-512 rows by model width)."}
    )
    chat: bool | None = field(
        default=None, metadata={"help": "Wrap prompts in the chat template (default: if the model has one)."}
    )
    data: str | None = field(default=None, metadata={"help": "Local data folder for the task."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})
    dtype: str | None = field(default=None, metadata={
        "help": "Weights dtype of a local model: float32, bfloat16 or float16 (default: float32 "
                "on CPU, bfloat16 on CUDA; float32 on CUDA reproduces CPU rows)."})
    embedder: str | None = field(
        default=None,
        metadata={"help": "For an API --model: local model computing the features, or "
                  "'server' for the server's /v1/embeddings (default: no features)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
    adapter: str | None = field(default=None, metadata={
        "help": "Sample from the policy of this adapter folder (`qprobe adapt`), on the base "
                "model it was trained on (--model is not used)."})
    pairs: bool = field(default=True, metadata={
        "help": "For a preference task: embed both answers of each pair and write pairs.parquet "
                "(--no-pairs: sample its prompts like any task's)."})
    # Where the batches run (qprobe.collect_ray); none of these is part of the folder's identity.
    executor: str = field(default="local", metadata={
        "help": "local (this process) or ray (actors on a Ray cluster; pip install 'qprobe[ray]')."})
    address: str | None = field(default=None, metadata={
        "help": "Ray: cluster address, e.g. 10.0.0.1:6379 or auto (default: $RAY_ADDRESS, else "
                "start Ray on this machine)."})
    workers: int | None = field(default=None, metadata={
        "help": "Ray: actors, each loading the model once (default: as many as the cluster's "
                "CPUs, or GPUs with --gpus-per-worker, fit)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "Ray: GPUs per actor (0: CPU)."})
    threads_per_worker: int = field(default=1, metadata={
        "help": "Ray: CPUs reserved per actor and torch threads in it."})
    retries: int = field(default=2, metadata={
        "help": "Ray: times a batch whose actor died is re-queued before it is reported as failed."})
    storage: str = field(default="auto", metadata={
        "help": "Ray: auto (actors that see the folder commit shards themselves, others return "
                "rows to this process), shared (require it) or driver (always return rows)."})


def load_task(name_or_path: str, data: str | None = None):
    """A task from `qprobe.tasks`, or a plain {id, prompt} JSONL file (rewards left empty)."""
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".gz") and path.is_file():
        from qprobe.tasks.custom import load_jsonl_task

        return load_jsonl_task(path, plain=True)
    from qprobe.tasks import get_task

    return get_task(name_or_path, data=data)


def load_collect_model(cfg: CollectConfig) -> LanguageModel:
    """The model `cfg` names: a backend with its own features gets the feature options; one that
    returns text gets `cfg.embedder` ("server", or a local model loaded as an Embedder)."""
    from qprobe.backends import load_embedder, load_model, resolve

    if cfg.adapter:
        if cfg.dtype:
            raise QProbeError("collect: --dtype applies to a local --model, not to --adapter")
        from qprobe.adapters.policy import AdapterLanguageModel

        return AdapterLanguageModel(cfg.adapter, layer=cfg.layer, position=cfg.position,
                                    feature_dtype=cfg.feature_dtype, device=cfg.device,
                                    max_batch_rows=cfg.batch_prompts * max(1, cfg.k or 16)
                                    if cfg.batch_prompts else None)
    if resolve(cfg.model, cfg.backend).own_features:
        if cfg.embedder:
            raise QProbeError("collect: --embedder is for API models; a local model computes "
                              "its own features")
        return load_model(cfg.model, backend=cfg.backend, layer=cfg.layer, position=cfg.position,
                          device=cfg.device, dtype=cfg.dtype, chat=cfg.chat,
                          feature_dtype=cfg.feature_dtype,
                          max_batch_rows=cfg.batch_prompts * max(1, cfg.k or 16)
                          if cfg.batch_prompts else None)
    emb = cfg.embedder
    if cfg.dtype and emb in (None, "server"):
        raise QProbeError("collect: --dtype applies to a local --model or --embedder; this "
                          "model is an API server")
    if emb and emb != "server":
        # The server gets the raw prompt (/v1/completions): no chat template by default.
        emb = load_embedder(emb, layer=cfg.layer, position=cfg.position, device=cfg.device,
                            dtype=cfg.dtype, chat=bool(cfg.chat), feature_dtype=cfg.feature_dtype)
    return load_model(cfg.model, backend=cfg.backend, embedder=emb)


def collect_meta(cfg: CollectConfig, lm: LanguageModel) -> dict[str, Any]:
    """meta.json keys beyond collect_task's: the task as the user named it (a path stays as
    typed), how prompts were sent and the backend class."""
    return {"task": cfg.task, "chat": bool(lm.chat), "backend": type(lm).__name__}


def collect(cfg: CollectConfig, lm: LanguageModel | None = None,
            say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a collection; returns the summary. `lm` may be a loaded LanguageModel
    (used by the local executor only). `say` gets the Ray executor's log lines (default: stderr).

    A preference task (one with `pairs`) embeds its pairs (`qprobe.preferences`) unless
    `cfg.pairs` is False."""
    if cfg.executor not in ("local", "ray"):
        raise QProbeError(f"collect: --executor must be local or ray, got {cfg.executor!r}")
    task = load_task(cfg.task, cfg.data)
    as_pairs = cfg.pairs and hasattr(task, "pairs")
    k = (0 if as_pairs else 16) if cfg.k is None else cfg.k
    try:
        if k < (0 if as_pairs else 1):
            raise QProbeError(f"collect: --k must be >= {0 if as_pairs else 1}, got {k}")
        if as_pairs and cfg.executor == "ray":
            raise QProbeError("collect: --executor ray does not embed preference pairs; "
                              "run it locally, or pass --no-pairs to sample the prompts")
        splits = task.splits()
        split = cfg.split
        if split is None:
            if len(splits) != 1:
                raise QProbeError(f"collect: task {cfg.task} has splits {', '.join(splits)}; pass --split")
            split = next(iter(splits))
        if not task.prompts(split, limit=cfg.limit):  # before loading a model for nothing
            raise QProbeError(f"collect: task {cfg.task} split {split} has no prompts")
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop=list(task.stop), seed=cfg.seed)
        cfg = replace(cfg, k=k)
        settings = {n: v for n, v in asdict(cfg).items() if n != "progress"}
        if cfg.executor == "ray":  # the actors load the model; `lm` is not used
            from qprobe.collect_ray import collect_ray

            return collect_ray(cfg, task, split, params, settings, say=say)
        if lm is None:
            lm = load_collect_model(cfg)
        if as_pairs:
            from qprobe.preferences import collect_pairs

            return collect_pairs(
                lm, task, split, cfg.out, k=k, params=params if k else None, limit=cfg.limit,
                batch_prompts=cfg.batch_prompts, progress=cfg.progress, settings=settings,
                meta_extra=collect_meta(cfg, lm))
        return collect_task(
            lm, task, split, cfg.out, k=k, params=params, limit=cfg.limit,
            batch_prompts=cfg.batch_prompts, progress=cfg.progress,
            meta_extra=collect_meta(cfg, lm), settings=settings,
        )
    finally:
        task.close()


def collect_task(lm: LanguageModel, task, split: str, out: str | Path, *, k: int,
                 params: SamplingParams, limit: int | None = None, prefix: str = "",
                 batch_prompts: int | None = None, meta_extra: dict[str, Any] | None = None,
                 settings: dict[str, Any] | None = None, progress: bool = True,
                 say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """k samples of `lm` per prompt of `task`/`split` (the first `limit`) into the rollouts
    folder `out`, scored by the task; creates or resumes it. Returns the summary.

    prefix: text put before each prompt (the few-shot baseline); the rows, the reward and the
        stored `prompt` keep the original prompt; a non-empty prefix is part of the meta identity.
    batch_prompts: prompts per `sample` call and shard (default: lm.max_batch_rows // k, >= 1).
    meta_extra: more identity keys for meta.json, overriding the defaults (model, task = the
        task's name, split, k, sampling, prefix).
    settings: recorded as the summary's "config" (e.g. the CollectConfig).
    say: called with one line when done (what was collected, or that nothing was left to do).
    """
    from qprobe.rollouts import RolloutWriter

    if k < 1:
        raise QProbeError(f"collect: k must be >= 1, got {k}")
    rows = task.prompts(split, limit=limit)
    if not rows:
        raise QProbeError(f"collect: task {task.name} split {split} has no prompts")
    meta = rollouts_meta(lm.name, task, split, k, params, prefix, meta_extra)
    writer = RolloutWriter(out, meta=meta, feature_spec=lm.feature_spec)
    per_batch = batch_prompts or max(1, lm.max_batch_rows // k)
    n_new, n_tokens, seconds = _run(lm, task, writer, rows, k, params, prefix, per_batch, progress)
    summary = _summary(writer, seconds, n_new, n_tokens, len(rows), settings)
    if n_new:  # a resume with nothing left to do keeps the summary of the run that wrote rows
        writer.update_meta(summary=summary)
    if say is not None:
        name = Path(out).name
        say(f"{name}: {len(rows)} prompts x {k} already collected" if not n_new else
            f"{name}: {n_new} new samples in {seconds:.0f}s, mean reward "
            + ("n/a" if summary["mean_reward"] is None else f"{summary['mean_reward']:.3f}"))
    return summary


def plan(rows: list[dict], k: int, done: set[tuple[str, int]], per_batch: int) -> list[list[dict]]:
    """The batches still to sample: `rows` cut every `per_batch` prompts, each batch keeping the
    prompts whose k samples are not all in `done`. Cutting the full list (not the remaining
    prompts) keeps a resumed batch the shape it had in the first run."""
    out = []
    for i in range(0, len(rows), per_batch):
        todo = [r for r in rows[i : i + per_batch]
                if not all((str(r["id"]), j) in done for j in range(k))]
        if todo:
            out.append(todo)
    return out


def sample_batch(lm, task, todo: list[dict], k: int, params: SamplingParams, prefix: str,
                 done: set[tuple[str, int]]) -> tuple[list[dict], np.ndarray | None, int]:
    """The batch work: k samples per prompt of `todo`, their features and their rewards.

    Returns (rows, features [rows, dim] or None, tokens sampled); samples whose key is in `done`
    are left out. Every executor (this process, a Ray actor) runs exactly this."""
    groups = lm.sample([prefix + r["prompt"] for r in todo], k, params)
    out_rows, feats, n_tokens = [], [], 0
    for r, group in zip(todo, groups):
        for j, s in enumerate(group):
            if (str(r["id"]), j) in done:
                continue
            out_rows.append(_row(str(r["id"]), j, r["prompt"], s))
            feats.append(s.feature)
            n_tokens += s.num_tokens or 0
    if not out_rows:
        return [], None, n_tokens
    by_id = {str(r["id"]): r for r in todo}
    columns = {c: [by_id[o["prompt_id"]].get(c) for o in out_rows]
               for c in todo[0] if c not in ("id", "prompt")}
    columns["prompt_id"] = [o["prompt_id"] for o in out_rows]
    rewards = task.reward([o["prompt"] for o in out_rows], [o["completion"] for o in out_rows],
                          **columns)
    for o, rw in zip(out_rows, rewards):
        o["reward"] = None if rw is None else float(rw)
    features = np.stack(feats) if lm.feature_spec is not None else None
    return out_rows, features, n_tokens


def rollouts_meta(model: str, task, split: str, k: int, params: SamplingParams, prefix: str = "",
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of a collection (meta.json): a resume with another identity is refused."""
    return {"model": model, "task": task.name, "split": split, "k": k,
            "sampling": params.to_dict(), **({"prefix": prefix} if prefix else {}),
            **(extra or {})}


def _run(lm, task, writer, rows: list[dict], k: int, params: SamplingParams, prefix: str,
         per_batch: int, progress: bool) -> tuple[int, int, float]:
    """Sample, score and append batch by batch; returns (new rows, their tokens, seconds)."""
    from tqdm import tqdm

    def complete(r: dict) -> bool:
        return all((str(r["id"]), j) in writer.done for j in range(k))

    n_done = sum(complete(r) for r in rows)
    bar = tqdm(total=len(rows), initial=n_done, unit="prompt", file=sys.stderr,
               disable=not progress, desc="collect", dynamic_ncols=True)
    t_start = time.time()
    n_tokens = n_rows = 0
    for i in range(0, len(rows), per_batch):
        # Planned batch by batch: another writer on the folder may have stored some meanwhile.
        todo = [r for r in rows[i : i + per_batch] if not complete(r)]
        if not todo:
            continue
        out_rows, features, tokens = sample_batch(lm, task, todo, k, params, prefix, writer.done)
        n_tokens += tokens
        # Another writer on the same folder may have stored some of these meanwhile: keep theirs.
        n_rows += writer.append(out_rows, features, skip_stored=True)
        bar.update(len(todo))
        dt = max(time.time() - t_start, 1e-9)
        bar.set_postfix_str(f"{n_tokens / dt:.0f} tok/s", refresh=False)
    bar.close()
    return n_rows, n_tokens, time.time() - t_start


def _row(prompt_id: str, j: int, prompt: str, s: Sample) -> dict[str, Any]:
    """One rollout row. num_tokens, logprob_sum and token_ids are null where the backend does
    not know them (an API returns text; token ids only when they are the model's own)."""
    known_ids = s.num_tokens is not None and len(s.token_ids) == s.num_tokens
    return {
        "prompt_id": prompt_id, "sample_idx": j, "prompt": prompt, "completion": s.text,
        "reward": None, "finish_reason": s.finish_reason, "num_tokens": s.num_tokens,
        "logprob_sum": s.logprob_sum, "token_ids": s.token_ids if known_ids else None,
    }


def _summary(writer, seconds: float, n_new: int, n_tokens: int, n_prompts: int,
             settings: dict[str, Any] | None) -> dict[str, Any]:
    from qprobe.rollouts import Rollouts

    r = Rollouts(writer.path)
    rewards = r.rewards
    scored = np.isfinite(rewards)
    summary = {
        "prompts": n_prompts,
        "stored_prompts": len(r.groups()[1]),  # in the folder: earlier runs' too
        "rows": len(r),
        "new_rows": n_new,
        "scored": int(scored.sum()),
        "mean_reward": float(rewards[scored].mean()) if scored.any() else None,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
    }
    if settings is not None:
        summary["config"] = settings
    return summary
