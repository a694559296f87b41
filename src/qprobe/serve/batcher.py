"""The request-batching queue in front of the model: requests that arrive together decode together.

One worker thread owns the model. It takes the oldest waiting request, waits `wait_s` (a few
ms) for others to arrive, and hands every waiting request with the same sampling settings
(k, temperature, top_p, max_tokens, stop, seed) to ONE `model.sample` call over all their
prompts: the local decode loop runs them as one batch, an upstream server gets them
concurrently. Each request is then scored by its own probe and chosen with its own seeded
generator, so its answer is the one the library's `best_of_k` gives alone: local and API
backends seed every sample from (seed, prompt text, sample index), never from the batch.

Restart-to-join. A burst of requests reaches the worker spread out: the first starts alone and
the rest would wait for the whole of its decode. So while a local batch is young (at most
`restart_frac` of its max_tokens steps done), requests with the same settings that arrive are
let in by aborting the running decode (a step hook raises `Restart`) and starting again with
the running prompts plus theirs, at most `max_restarts` times per batch so nothing starves.
A restarted request gets exactly the samples it would have got: they do not depend on the
batch. The cost is the aborted steps (and prefill), decoded again. Only for models whose
`sample` takes a step hook (the local backend); an upstream server already runs requests
concurrently. This is not continuous batching: rows never enter a batch mid-decode.

Requests without a seed share one fresh seed per batch (reported in the response), so they batch
together; two identical unseeded prompts in the same batch therefore get the same candidates.
A restarted batch keeps its seed: unseeded requests that join it are seeded by it.

The queue is bounded: `submit` raises `QueueFull` (the server answers 429 with Retry-After).
A cancelled request (client gone, timeout) is dropped if it has not started; once its batch
runs, the batch finishes (the other rows need it) and its result is thrown away, unless the
batch restarts: it is left out of the new one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("qprobe.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Restart(Exception):
    """Raised from the join hook inside `model.sample`: abort the running decode and start again
    with its requests plus `joined` (already taken from the queue). `steps`: decode steps the
    aborted call had done (thrown away)."""

    def __init__(self, joined: list[Job], steps: int) -> None:
        super().__init__(f"restart: {len(joined)} request(s) join after {steps} step(s)")
        self.joined, self.steps = joined, steps


@dataclass(frozen=True)
class SamplingKey:
    """What must match for requests to share one `sample` call."""

    k: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # None: the batch draws one


@dataclass
class Job:
    """One request: its prompts, settings, probe and where its result goes."""

    prompts: list[str]
    key: SamplingKey
    probe: Any  # models.ServedProbe
    beta: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when the batch it runs in started (or it joined one by restart)


@dataclass
class Result:
    """Per prompt: the policy's Choice and the k samples (for token counts)."""

    choices: list[Any]  # policy.Choice per prompt
    samples: list[list[Any]]  # [prompt][k] backend Samples
    seed: int
    batch_requests: int  # requests that shared this request's sample call
    prompt_tokens: int  # the prompts' tokens as the model reads them (0 if unknown)
    queued_s: float  # from submit to the start of its batch (or its joining one)
    batch_s: float  # from then: sample call (aborted steps included), scoring and choice


class Batcher:
    """A bounded queue and one worker thread calling `served.model.sample` in batches.

    max_queue: most waiting requests (beyond them: QueueFull). max_batch: most prompts in one
    sample call. wait_s: how long the worker waits for more requests after the first, and only
    while other requests are arriving (`arriving()` was called for them and they are not yet
    submitted): a lone request starts at once. max_restarts: times one batch may restart to let
    newcomers join (0: never); restart_frac: only while at most this fraction of its max_tokens
    steps are done (see the module docstring).
    """

    def __init__(self, served: Any, max_queue: int = 64, max_batch: int = 32,
                 wait_s: float = 0.010, max_restarts: int = 2, restart_frac: float = 0.25) -> None:
        self.served = served
        self.max_queue, self.max_batch, self.wait_s = int(max_queue), int(max_batch), float(wait_s)
        # An upstream model (or a policy with its own step hook) takes no hook: no restarts.
        self.max_restarts = int(max_restarts) if _takes_step_hook(served.model) else 0
        self.restart_frac = float(restart_frac)
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self._closed = False
        self._batch_s = 1.0  # moving average of a batch's duration (Retry-After)
        self.stats = {"batches": 0, "requests": 0, "cancelled": 0, "max_batch_requests": 0,
                      "rejected": 0, "restarts": 0, "restart_steps": 0}
        self.running = 0
        self._arriving = 0  # requests being read and checked, not yet submitted
        self._thread = threading.Thread(target=self._work, name="qprobe-serve-batcher",
                                        daemon=True)
        self._thread.start()

    # -- event-loop side

    def arriving(self) -> None:
        """A request is being read: the worker may wait for it (call `arrived` when done)."""
        with self._cv:
            self._arriving += 1

    def arrived(self) -> None:
        """The request announced by `arriving` was submitted or refused."""
        with self._cv:
            self._arriving -= 1
            self._cv.notify()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected"] += 1
                waits = 1 + len(self._queue) // max(self.max_batch, 1)
                raise QueueFull(max(1, math.ceil(self._batch_s * waits)))
            self._queue.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job` if it still waits; else its result is discarded when its batch ends."""
        with self._cv:
            if not job.cancelled:
                job.cancelled = True
                self.stats["cancelled"] += 1
            if job in self._queue:
                self._queue.remove(job)

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._queue:
                _deliver(job, error=RuntimeError("the server is shutting down"))
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # -- worker side

    def _take(self) -> list[Job] | None:
        """Block for the oldest request, wait `wait_s` for company, take its batch."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.wait_s
            while self._arriving > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if not self._queue:
                return []
            batch = self._pick(self._queue[0].key, 0)
            self.running = len(batch)
            return batch

    def _pick(self, key: SamplingKey, n: int) -> list[Job]:
        """Take the queued requests with `key`, oldest first, while the prompts stay within
        max_batch (`n` prompts already run; the first request always fits an empty batch).
        The caller holds the lock."""
        picked: list[Job] = []
        for job in self._queue:
            if job.key != key:
                continue
            if n and n + len(job.prompts) > self.max_batch:
                break
            picked.append(job)
            n += len(job.prompts)
        now = time.monotonic()
        for job in picked:
            self._queue.remove(job)
            job.started = now
        return picked

    def _join_hook(self, key: SamplingKey, n: int) -> Callable[..., None]:
        """A decode-loop step hook that never changes the logits: while the running batch (`n`
        prompts) is young, it raises `Restart` with the queued requests that can join it."""
        young = int(self.restart_frac * key.max_tokens)  # most steps a restart throws away
        calls = 0  # steps done, over all of the sample call's chunks

        def hook(step: int, hidden: Any, logits: Any, rows: Any) -> None:
            nonlocal calls
            done, calls = calls, calls + 1
            if done > young or not self._queue:  # unlocked peek; _pick runs under the lock
                return None
            with self._cv:
                joined = [] if self._closed else self._pick(key, n)
            if joined:
                raise Restart(joined, done)
            return None

        return hook

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - delivered to the requests, never fatal
                log.warning("batch of %d request(s) failed: %s", len(batch), type(e).__name__)
                for job in batch:
                    _deliver(job, error=e)
            finally:
                with self._cv:
                    self.running = 0
                dt = time.monotonic() - t0
                self._batch_s = 0.8 * self._batch_s + 0.2 * dt

    def _run(self, batch: list[Job]) -> None:
        """Sample, score and deliver `batch`. On a restart `batch` grows in place, so that
        `_work` delivers a failure to the requests that joined too."""
        from qprobe.backends.base import SamplingParams
        from qprobe.policy import QProbePolicy

        key = batch[0].key
        # One seed for the batch's unseeded requests; a restart keeps it (joiners get it too).
        seed = key.seed if key.seed is not None else secrets.randbits(31)
        params = SamplingParams(temperature=key.temperature, top_p=key.top_p,
                                max_new_tokens=key.max_tokens, stop=list(key.stop), seed=seed)
        restarts = 0
        while True:
            prompts = [p for job in batch for p in job.prompts]
            try:
                if restarts < self.max_restarts:
                    hook = self._join_hook(key, len(prompts))
                    samples = self.served.model.sample(prompts, key.k, params, hook=hook)
                else:
                    samples = self.served.model.sample(prompts, key.k, params)  # [P][k]
                break
            except Restart as r:
                # Cancelled requests are left out of the new batch: nobody waits for them.
                batch[:] = [job for job in batch if not job.cancelled] + r.joined
                restarts += 1
                self.stats["restarts"] += 1
                self.stats["restart_steps"] += r.steps
                with self._cv:
                    self.running = len(batch)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
        i = 0
        for job in batch:
            mine = samples[i : i + len(job.prompts)]
            i += len(job.prompts)
            if job.cancelled:
                continue
            try:
                policy = QProbePolicy(self.served.model, job.probe.probe, k=key.k, beta=job.beta,
                                      params=params, embedder=self.served.embedder, seed=seed)
                rng = np.random.default_rng(seed)  # as best_of_k(..., seed=seed) would
                choices = policy.select(job.prompts, mine, rngs=[rng] * len(job.prompts))
                # tokenised here: the tokenizer is not safe to share across threads
                n_prompt = sum(self.served.prompt_tokens(p) for p in job.prompts)
                _deliver(job, result=Result(choices, mine, seed, len(batch), n_prompt,
                                            job.started - job.enqueued,
                                            time.monotonic() - job.started))
            except BaseException as e:  # noqa: BLE001
                _deliver(job, error=e)


def _takes_step_hook(model: Any) -> bool:
    """Whether `model.sample` takes a decode-loop step hook (`hook=`): the local backend's does;
    an upstream API model's, or a policy that runs its own hook (guided), does not."""
    try:
        return "hook" in inspect.signature(model.sample).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _deliver(job: Job, result: Result | None = None, error: BaseException | None = None) -> None:
    def put() -> None:
        if job.future.done() or job.cancelled:  # nobody waits for a cancelled job's answer
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(put)
    except RuntimeError:  # the event loop is closed: nobody waits any more
        pass
