"""Collect rollouts: k completions per prompt, their features and rewards, into a rollouts folder.

One shard per batch of prompts, written atomically by `RolloutWriter`; re-running the same
collection resumes (prompts whose k samples are all stored are skipped), and a run with other
settings is refused by the writer (meta identity). Progress goes to stderr (tqdm).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import QProbeError


@dataclass
class CollectConfig:
    """What `qprobe collect` does (every field is a command line flag)."""

    out: str = field(metadata={"help": "Rollouts folder to create or resume."})
    task: str = field(default="mbpp", metadata={"help": "Task name, or a .jsonl of {id, prompt} rows."})
    split: str | None = field(default=None, metadata={"help": "Task split (default: the only one)."})
    model: str | None = field(default=None, metadata={"help": "Model (default: embedded SmolLM2)."})
    k: int = field(default=16, metadata={"help": "Samples per prompt."})
    layer: int | None = field(default=None, metadata={"help": "Feature layer (negative: from top)."})
    position: str = field(default="last", metadata={"help": "Feature position: last or mean."})
    feature_dtype: str = field(default="float16", metadata={"help": "Stored feature dtype."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per completion at most."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed; each (prompt, sample) is seeded."})
    batch_prompts: int | None = field(
        default=None, metadata={"help": "Prompts per batch and shard (default: the model's rows at once // k, >= 1; 128-512 rows by model width)."}
    )
    chat: bool | None = field(
        default=None, metadata={"help": "Wrap prompts in the chat template (default: if the model has one)."}
    )
    data: str | None = field(default=None, metadata={"help": "Local data folder for the task."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})
    embedder: str | None = field(
        default=None,
        metadata={"help": "For an http(s):// --model: local model computing the features, or "
                  "'server' for the server's /v1/embeddings (default: no features)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})


class PromptFile:
    """A JSONL file of {"id", "prompt"} rows (optional "split"): prompts without a reward."""

    stop: list[str] = []

    def __init__(self, path: Path) -> None:
        from qprobe.tasks.base import read_jsonl

        self.name = str(path)
        self._splits: dict[str, list[dict]] = {}
        seen: set[str] = set()
        for n, r in enumerate(read_jsonl(path), 1):
            if not isinstance(r.get("prompt"), str) or "id" not in r:
                raise QProbeError(f"{path}:{n}: each row needs an 'id' and a string 'prompt'")
            row = dict(r, id=str(r["id"]))
            if row["id"] in seen:
                raise QProbeError(f"{path}:{n}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            self._splits.setdefault(str(r.get("split", "all")), []).append(row)
        if not self._splits:
            raise QProbeError(f"{path}: no rows")

    def splits(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._splits.items()}

    def prompts(self, split: str, limit: int | None = None) -> list[dict]:
        if split not in self._splits:
            raise QProbeError(f"{self.name}: no split {split!r}; splits are {', '.join(self._splits)}")
        rows = self._splits[split]
        return rows if limit is None else rows[:limit]

    def reward(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        return [None] * len(prompts)

    def close(self) -> None:
        pass


def load_task(name_or_path: str, data: str | None = None):
    """A task from `qprobe.tasks`, or a plain prompts file (rewards left empty)."""
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".gz") and path.is_file():
        from qprobe.tasks.base import read_jsonl

        first = next(iter(read_jsonl(path)), {})
        if not ({"tests", "answer", "chosen"} & set(first)):
            return PromptFile(path)
    from qprobe.tasks import get_task

    return get_task(name_or_path, data=data)


def _batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def collect(cfg: CollectConfig, lm=None) -> dict[str, Any]:
    """Run (or resume) a collection; returns the summary. `lm` may be a loaded LanguageModel."""
    from qprobe.backends import SamplingParams, load_model
    from qprobe.rollouts import RolloutWriter

    if cfg.k < 1:
        raise QProbeError(f"collect: --k must be >= 1, got {cfg.k}")
    task = load_task(cfg.task, cfg.data)
    try:
        splits = task.splits()
        split = cfg.split
        if split is None:
            if len(splits) != 1:
                raise QProbeError(f"collect: task {cfg.task} has splits {', '.join(splits)}; pass --split")
            split = next(iter(splits))
        rows = task.prompts(split, limit=cfg.limit)
        if not rows:
            raise QProbeError(f"collect: task {cfg.task} split {split} has no prompts")
        if lm is None and str(cfg.model).startswith(("http://", "https://")):
            emb = cfg.embedder
            if emb and emb != "server":
                from qprobe.backends import load_embedder

                # The server gets the raw prompt (/v1/completions): no chat template by default.
                emb = load_embedder(emb, layer=cfg.layer, position=cfg.position, device=cfg.device,
                                    chat=bool(cfg.chat), feature_dtype=cfg.feature_dtype)
            lm = load_model(cfg.model, embedder=emb)
        elif lm is None:
            if cfg.embedder:
                raise QProbeError("collect: --embedder is for http(s):// models; a local model "
                                  "computes its own features")
            lm = load_model(cfg.model, layer=cfg.layer, position=cfg.position, device=cfg.device,
                            chat=cfg.chat, feature_dtype=cfg.feature_dtype,
                            max_batch_rows=cfg.batch_prompts * cfg.k if cfg.batch_prompts else None)
        # The model says how many rows it decodes at once (local: by its width; API: 128).
        rows_at_once = getattr(lm, "max_batch_rows", None) or 128
        per_batch = cfg.batch_prompts or max(1, rows_at_once // cfg.k)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, stop=list(task.stop), seed=cfg.seed)
        meta = {
            "model": lm.name,
            "task": cfg.task,
            "split": split,
            "k": cfg.k,
            "sampling": params.to_dict(),
            "chat": bool(getattr(lm, "chat", False)),
            "backend": type(lm).__name__,
        }
        writer = RolloutWriter(cfg.out, meta=meta, feature_spec=lm.feature_spec)
        return _run(cfg, task, lm, params, writer, rows, per_batch)
    finally:
        task.close()


def _run(cfg, task, lm, params, writer, rows, per_batch) -> dict[str, Any]:
    from tqdm import tqdm

    def complete(r: dict) -> bool:
        return all((r["id"], j) in writer.done for j in range(cfg.k))

    n_done = sum(complete(r) for r in rows)
    bar = tqdm(total=len(rows), initial=n_done, unit="prompt", file=sys.stderr,
               disable=not cfg.progress, desc="collect", dynamic_ncols=True)
    t_start = time.time()
    n_tokens = n_rows = 0
    for batch in _batches(rows, per_batch):
        todo = [r for r in batch if not complete(r)]
        if not todo:
            continue
        groups = lm.sample([r["prompt"] for r in todo], cfg.k, params)
        out_rows, feats = [], []
        for r, group in zip(todo, groups):
            for j, s in enumerate(group):
                if (r["id"], j) in writer.done:
                    continue
                out_rows.append({
                    "prompt_id": r["id"], "sample_idx": j, "prompt": r["prompt"],
                    "completion": s.text, "reward": None, "finish_reason": s.finish_reason,
                    "num_tokens": len(s.token_ids),
                })
                feats.append(s.feature)
                n_tokens += len(s.token_ids)
        by_id = {r["id"]: r for r in todo}
        columns = {c: [by_id[o["prompt_id"]].get(c) for o in out_rows]
                   for c in todo[0] if c not in ("id", "prompt")}
        columns["prompt_id"] = [o["prompt_id"] for o in out_rows]
        rewards = task.reward([o["prompt"] for o in out_rows], [o["completion"] for o in out_rows],
                              **columns)
        for o, rw in zip(out_rows, rewards):
            o["reward"] = None if rw is None else float(rw)
        features = np.stack(feats) if lm.feature_spec is not None else None
        writer.append(out_rows, features)
        n_rows += len(out_rows)
        bar.update(len(todo))
        dt = max(time.time() - t_start, 1e-9)
        bar.set_postfix_str(f"{n_tokens / dt:.0f} tok/s", refresh=False)
    bar.close()
    summary = _summary(writer, time.time() - t_start, n_rows, n_tokens, len(rows), cfg)
    if n_rows:  # a resume with nothing left to do keeps the summary of the run that wrote rows
        writer.update_meta(summary=summary)
    return summary


def _summary(writer, seconds: float, n_new: int, n_tokens: int, n_prompts: int, cfg) -> dict[str, Any]:
    from qprobe.rollouts import Rollouts

    r = Rollouts(writer.path)
    rewards = r.rewards
    scored = np.isfinite(rewards)
    return {
        "prompts": n_prompts,
        "rows": len(r),
        "new_rows": n_new,
        "scored": int(scored.sum()),
        "mean_reward": float(rewards[scored].mean()) if scored.any() else None,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    }
