"""`qprobe collect --executor ray`: the same collection, its batches spread over Ray actors.

The driver (the process running `qprobe collect`) plans what is not stored yet, exactly as the
local loop does (`core.plan`: the prompts cut every `batch_prompts`, stored prompts left out),
and hands the batches to actors, one batch per actor at a time. Each actor (`CollectWorker`)
loads the model and the task once and runs `core.BatchWork` on its batches: sampling, features
and sandboxed rewards, or a preference pair's two answers embedded (the driver then rewrites
pairs.parquet after each batch), the local collector's batch work. Samples are seeded per
(prompt, sample), so they do not depend on which actor drew them.

Where the shards are written:
- an actor that sees the rollouts folder (shared storage: the driver writes a marker file with a
  random token into it, and the actor reads the token back) appends its shards itself, through
  the multi-writer store (`rollouts.RolloutWriter`: lock, no-clobber shard names, stored keys
  skipped);
- an actor that does not see it returns its rows and features, and the driver appends them.
`--storage shared` requires the first mode and `--storage driver` forces the second.

Faults: an actor that dies (killed, out of memory, its node lost) has its batch re-queued and is
replaced by a new actor; a batch that has killed `retries + 1` actors is reported and not tried
again in this run (the run goes on, then exits with an error naming it; a rerun tries it again).
The driver's own crash loses at most the batches in flight: the done set is on disk, so rerunning
the same command resumes, on one machine or a cluster.

Ray is imported only here, and only when this executor is chosen.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.collect.config import CollectConfig, RayConfig
from qprobe.collect.core import BatchWork, Draw, plan, summarize, write_pairs
from qprobe.collect.model import collect_meta, load_collect_model
from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write_text
from qprobe.tasks import load_task

MARKER = ".qprobe-ray-marker"  # in the rollouts folder while a Ray collection runs


def _import_ray():
    try:
        import ray
    except ImportError:
        raise QProbeError("collect: --executor ray needs Ray: pip install 'qprobe[ray]'") from None
    return ray


class CollectWorker:
    """One Ray actor: the model and the task loaded once, then batch after batch."""

    def __init__(self, cfg: CollectConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.lm = load_collect_model(cfg)
        self.task = load_task(cfg.task, cfg.data)
        self.writer = None
        self.work: BatchWork | None = None
        self.job: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        """What the driver needs before it opens the folder: the model's identity and batch size."""
        import ray

        lm = self.lm
        return {"model": lm.name, "feature_spec": lm.feature_spec,
                "max_batch_rows": lm.max_batch_rows, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}

    def meta_extra(self, cfg: CollectConfig) -> dict[str, Any]:
        return collect_meta(cfg, self.lm)

    def attach(self, job: dict[str, Any]) -> dict[str, Any]:
        """Take the run's settings; open the rollouts folder if this node sees the driver's marker.

        Returns where this actor's shards go ("shared": it commits them) and where it runs."""
        from qprobe.rollouts import RolloutWriter

        self.job = job
        self.work = BatchWork(self.lm, self.task, job["draw"])
        try:
            seen = (Path(job["out"]) / MARKER).read_text() == job["token"]
        except OSError:
            seen = False
        if job["storage"] == "shared" and not seen:
            raise QProbeError(f"collect: {socket.gethostname()} does not see {job['out']} "
                              "(--storage shared needs the rollouts folder on shared storage)")
        if seen and job["storage"] != "driver":
            self.writer = RolloutWriter(job["out"], meta=job["meta"],
                                        feature_spec=self.lm.feature_spec)
        return {"shared": self.writer is not None, **self.info()}

    def run(self, todo: list[dict], stored: list[tuple[str, int]]) -> dict[str, Any]:
        """Sample, score and commit one batch (or return it when the folder is not shared)."""
        done = set(stored) | (self.writer.done if self.writer is not None else set())
        rows, features, tokens = self.work(todo, done)
        if self.writer is not None:
            n = self.writer.append(rows, features, skip_stored=True)
            return {"committed": n, "tokens": tokens, "rows": None, "features": None}
        return {"committed": 0, "tokens": tokens, "rows": rows, "features": features}


@dataclass
class _Batch:
    index: int  # position in the plan (batch `index` of the local run)
    todo: list[dict]
    stored: list[tuple[str, int]]  # keys of these prompts already stored at planning time
    deaths: int = 0

    def label(self) -> str:
        ids = [str(r["id"]) for r in self.todo]
        return f"batch {self.index} (prompts {ids[0]}" + (f"..{ids[-1]})" if len(ids) > 1 else ")")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resources(ray, cfg: RayConfig) -> tuple[int, int, dict[str, float]]:
    """(actors to start, how many the cluster holds, each one's Ray resources)."""
    if cfg.threads_per_worker < 1 or cfg.gpus_per_worker < 0:
        raise QProbeError("collect: --threads-per-worker must be >= 1 and --gpus-per-worker >= 0")
    if cfg.workers is not None and cfg.workers < 1:
        raise QProbeError(f"collect: --workers must be >= 1, got {cfg.workers}")
    if cfg.retries < 0:
        raise QProbeError(f"collect: --retries must be >= 0, got {cfg.retries}")
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fit = int(cpus // cfg.threads_per_worker)
    if cfg.gpus_per_worker > 0:
        fit = min(fit, int(gpus // cfg.gpus_per_worker))
    if fit < 1:
        raise QProbeError(f"collect: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; an actor "
                          f"needs {cfg.threads_per_worker} CPUs and {cfg.gpus_per_worker:g} GPUs")
    return cfg.workers or fit, fit, {"num_cpus": cfg.threads_per_worker,
                                     "num_gpus": cfg.gpus_per_worker}


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray connected (to `address`, else $RAY_ADDRESS, else a new local Ray) for the block; yields
    the `ray` module. Already connected: kept as it is (an experiment connects once for all its
    collections)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="warning")
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def collect_ray(cfg: CollectConfig, task, split: str, draw: Draw,
                settings: dict[str, Any], say: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the collection `cfg` describes (what each prompt gets: `draw`) on Ray
    actors placed by `cfg.ray`; returns the summary (with an "executor" entry: actors, which of
    them committed shards, deaths, failed batches)."""
    with ray_session(cfg.ray.address) as ray:
        return _drive(ray, cfg, task, split, draw, settings, say or _stderr)


def _drive(ray, cfg, task, split, draw, settings, say) -> dict[str, Any]:
    n_workers, fit, options = _resources(ray, cfg.ray)
    if n_workers > fit:
        say(f"collect (ray): the cluster holds {fit} of the {n_workers} actors; the others "
            "start when Ray finds room")
    Worker = ray.remote(max_restarts=0, max_task_retries=0, **options)(CollectWorker)
    actors: list[Any] = []  # every actor started, ended when the collection ends however it ends
    try:
        return _schedule(ray, cfg, task, split, draw, settings, say, Worker, actors, n_workers)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def _schedule(ray, cfg, task, split, draw, settings, say, Worker, actors: list[Any],
              n_workers: int) -> dict[str, Any]:
    """Start the actors, learn the model's identity, open the folder, then hand out batches."""
    from tqdm import tqdm

    from qprobe.rollouts import RolloutWriter

    rc = cfg.ray
    rows = draw.rows(task, split, cfg.limit)
    t0 = time.time()
    actors.extend(Worker.remote(cfg, rc.threads_per_worker) for _ in range(n_workers))
    say(f"collect (ray): {n_workers} actors x {rc.threads_per_worker} CPU"
        + (f" + {rc.gpus_per_worker:g} GPU" if rc.gpus_per_worker else "") + "; loading the model")
    # The first actor to load the model tells the folder's identity; the others load meanwhile.
    info_refs = {a.info.remote(): a for a in actors}
    info, meta_extra = None, None
    while info is None:
        ready, _ = ray.wait(list(info_refs), num_returns=1)
        actor = info_refs.pop(ready[0])
        try:
            info = ray.get(ready[0])
            meta_extra = ray.get(actor.meta_extra.remote(cfg))
        except ray.exceptions.RayActorError as e:
            if not info_refs or getattr(e, "actor_init_failed", False):
                raise _load_failed(e) from None
    meta = draw.meta(info["model"], task, split, meta_extra)
    writer = RolloutWriter(cfg.out, meta=meta, feature_spec=info["feature_spec"])
    per_batch = cfg.batch_prompts or draw.per_batch(info["max_batch_rows"])
    done = writer.done
    queue = deque(_Batch(i, todo, [(str(r["id"]), j) for r in todo for j in draw.keys
                                   if (str(r["id"]), j) in done])
                  for i, todo in enumerate(plan(rows, draw.keys, done, per_batch)))
    n_batches = len(queue)
    token = secrets.token_hex(16)
    marker = Path(cfg.out) / MARKER
    atomic_write_text(marker, token)
    job = {"out": str(Path(cfg.out).resolve()), "meta": meta, "token": token, "draw": draw,
           "storage": rc.storage}
    stats = {"actors": n_workers, "committed_by_actors": 0, "returned_to_driver": 0, "deaths": 0,
             "failed_batches": []}
    where: dict[Any, str] = {}  # actor -> "node host pid" once it has attached
    # An actor gets batches once it has attached, so a replacement that the cluster cannot
    # place (its node lost, no room left) holds no batch: the others finish the run.
    pending_attach = {a.attach.remote(job): a for a in actors}
    idle: list[Any] = []
    running: dict[Any, tuple[Any, _Batch]] = {}
    bar = tqdm(total=len(rows), initial=len(rows) - sum(len(b.todo) for b in queue),
               unit="prompt", file=sys.stderr, disable=not cfg.progress, desc="collect (ray)",
               dynamic_ncols=True)
    t_start, t_first = time.time(), None
    n_new = n_tokens = 0

    def replace(actor) -> None:
        ray.kill(actor, no_restart=True)
        new = Worker.remote(cfg, rc.threads_per_worker)
        actors.append(new)
        pending_attach[new.attach.remote(job)] = new

    try:
        while queue or running:
            while queue and idle:
                actor, batch = idle.pop(0), queue.popleft()
                running[actor.run.remote(batch.todo, batch.stored)] = (actor, batch)
            ready, _ = ray.wait([*running, *pending_attach], num_returns=1)
            ref = ready[0]
            if ref in pending_attach:  # an actor attached: say where it runs and what it does
                actor = pending_attach.pop(ref)
                try:
                    a = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise _load_failed(e) from None
                    stats["deaths"] += 1
                    say("collect (ray): an actor died before its first batch; replaced")
                    if queue or running:
                        replace(actor)
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise QProbeError(f"collect (ray): {_cause(e)}") from None
                idle.append(actor)
                where[actor] = f"node {a['node'][:8]} ({a['host']}, pid {a['pid']})"
                say(f"collect (ray): actor on {where[actor]}: " + (
                    "commits its shards to the shared rollouts folder" if a["shared"] else
                    "returns its rows to the driver (rollouts folder not seen or --storage driver)"))
                continue
            actor, batch = running.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise _load_failed(e) from None
                stats["deaths"] += 1
                batch.deaths += 1
                gone = where.get(actor, "an actor")
                if batch.deaths > rc.retries:
                    stats["failed_batches"].append(batch.label())
                    say(f"collect (ray): {gone} died in {batch.label()}; it has killed "
                        f"{batch.deaths} actors: reported, not retried")
                else:
                    queue.append(batch)
                    say(f"collect (ray): {gone} died in {batch.label()}; re-queued "
                        f"(death {batch.deaths} of at most {rc.retries + 1})")
                if queue or running:
                    replace(actor)
                continue
            except ray.exceptions.RayTaskError as e:
                raise QProbeError(f"collect (ray): {batch.label()} failed: {_cause(e)}") from None
            idle.append(actor)
            n_tokens += res["tokens"]
            if res["rows"] is not None:
                n = writer.append(res["rows"], res["features"], skip_stored=True)
                stats["returned_to_driver"] += n
            else:
                n = res["committed"]
                stats["committed_by_actors"] += n
            n_new += n
            if draw.pairs:  # the actors' shards are in the folder: list the complete pairs
                write_pairs(writer, rows)
            if n and t_first is None:
                t_first = time.time()
                say(f"collect (ray): first shard committed {t_first - t0:.1f}s after start")
            bar.update(len(batch.todo))
            bar.set_postfix_str(f"{n_tokens / max(time.time() - t_start, 1e-9):.0f} tok/s",
                                refresh=False)
    finally:
        bar.close()
        marker.unlink(missing_ok=True)
    if draw.pairs:
        write_pairs(writer, rows)
    seconds = time.time() - t_start
    summary = summarize(writer, draw, rows, seconds, n_new, n_tokens, settings)
    summary["executor"] = {"kind": "ray", "batches": n_batches, **stats,
                           "first_shard_s": None if t_first is None else round(t_first - t0, 2)}
    if n_new:
        writer.update_meta(summary=summary)
    if stats["failed_batches"]:
        raise QProbeError(f"collect (ray): {len(stats['failed_batches'])} of {n_batches} batches "
                          f"kept killing actors and were not collected: "
                          f"{'; '.join(stats['failed_batches'])}; the rest is stored, rerun to "
                          "retry them")
    return summary


def _load_failed(e: Exception) -> QProbeError:
    return QProbeError(f"collect (ray): an actor could not load the model or the task: {_cause(e)}")


def _cause(e: Exception) -> str:
    """The first line that says what went wrong, from a Ray error's text."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, QProbeError):
        return str(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("qprobe.errors.QProbeError:", "QProbeError:")):
            return ln.split(":", 1)[1].strip()
    errs = [ln for ln in lines if "Error" in ln.split(":", 1)[0]]
    return errs[-1] if errs else (lines[0] if lines else type(e).__name__)
