"""The request-batching queue in front of the policies: requests that arrive together decode together.

One worker thread owns the models. It takes the oldest waiting request, waits `wait_s` (a few
ms) for others to arrive, and hands every waiting request with the same sampling settings
(the policy's sampler, k, temperature, top_p, max_tokens, stop, seed) to ONE `policy.sample`
call over all their prompts: the local decode loop runs them as one batch, an upstream server
gets them concurrently. Each request is then answered by its own policy's `choose` (its probe,
its seeded generator), so its answer is the one the library's policy gives alone: local and API
backends seed every sample from (seed, prompt text, sample index), never from the batch.
Policies with the same `sampler_id` (best-of-k on any probe, logprob, sample: the model's plain
samples) share batches; a guided or adapter policy batches with requests of its own.

Streaming: a request of a per-token policy (`policy.streams`) that asks for a stream gets each
of its answers' text as the decode loop decides it, through the loop's step observer
(`StreamRows`), while the batch runs.

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
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qprobe.serve.models import prompt_tokens

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

    sampler: str  # `Policy.sampler_id`
    k: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # None: the batch draws one


@dataclass
class Job:
    """One request: its prompts, settings, policy and where its result goes.

    stream: called on the event loop with (prompt index, answer index r < n, text) for each
    piece of an answer's text as it is decided (per-token policies only); None: no stream."""

    prompts: list[str]
    key: SamplingKey
    policy: Any  # policy.base.Policy with the request's options
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    n: int = 1
    stream: Callable[[int, int, str], None] | None = None
    sent: dict[tuple[int, int], str] = field(default_factory=dict)  # text streamed per answer
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when the batch it runs in started (or it joined one by restart)


@dataclass
class Result:
    """Per prompt: the policy's Answer (its candidates, for token counts, and its choice)."""

    answers: list[Any]  # policy.base.Answer per prompt
    seed: int
    batch_requests: int  # requests that shared this request's sample call
    prompt_tokens: int  # the prompts' tokens as the model reads them (0 if unknown)
    queued_s: float  # from submit to the start of its batch (or its joining one)
    batch_s: float  # from then: sample call (aborted steps included), scoring and choice


class Batcher:
    """A bounded queue and one worker thread calling the policies' `sample` in batches.

    max_queue: most waiting requests (beyond them: QueueFull). max_batch: most prompts in one
    sample call. wait_s: how long the worker waits for more requests after the first, and only
    while other requests are arriving (`arriving()` was called for them and they are not yet
    submitted): a lone request starts at once. max_restarts: times one batch may restart to let
    newcomers join (0: never); restart_frac: only while at most this fraction of its max_tokens
    steps are done (see the module docstring).
    """

    def __init__(self, max_queue: int = 64, max_batch: int = 32,
                 wait_s: float = 0.010, max_restarts: int = 2, restart_frac: float = 0.25) -> None:
        self.max_queue, self.max_batch, self.wait_s = int(max_queue), int(max_batch), float(wait_s)
        # Only batches whose policy's `sample` takes the join hook restart (`Policy.joins`).
        self.max_restarts = int(max_restarts)
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
        """Sample, choose and deliver `batch`. On a restart `batch` grows in place, so that
        `_work` delivers a failure to the requests that joined too."""
        from qprobe.backends.base import SamplingParams

        key = batch[0].key
        lead = batch[0].policy  # every job's policy samples as this one does (same sampler_id)
        # One seed for the batch's unseeded requests; a restart keeps it (joiners get it too).
        seed = key.seed if key.seed is not None else secrets.randbits(31)
        params = SamplingParams(temperature=key.temperature, top_p=key.top_p,
                                max_new_tokens=key.max_tokens, stop=list(key.stop), seed=seed)
        max_restarts = self.max_restarts if lead.joins else 0
        restarts = 0
        while True:
            prompts = [p for job in batch for p in job.prompts]
            hook = self._join_hook(key, len(prompts)) if restarts < max_restarts else None
            observe = None
            if any(job.stream is not None and job.policy.streams for job in batch):
                observe = StreamRows([job for job in batch], list(key.stop), lead.decode)
            try:
                samples = lead.sample(prompts, key.k, params, hook=hook, observe=observe)
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
                rng = np.random.default_rng(seed)  # as the library's generate(seed=seed) would
                answers = job.policy.choose(job.prompts, mine, [rng] * len(job.prompts))
                # tokenised here: the tokenizer is not safe to share across threads
                n_prompt = sum(prompt_tokens(job.policy.model, p) for p in job.prompts)
                _deliver(job, result=Result(answers, seed, len(batch), n_prompt,
                                            job.started - job.enqueued,
                                            time.monotonic() - job.started))
            except BaseException as e:  # noqa: BLE001
                _deliver(job, error=e)


class StreamRows:
    """The decode loop's step observer for a batch with streaming requests: after each step,
    the new text of each streamed answer row goes to its request (`Job.stream`, on its event
    loop). Only text that can no longer change is sent: never the last (longest stop string - 1)
    characters, which a stop string completed later would cut, nor an unfinished UTF-8
    character; a row that ends at a step (EOS, stop string) sends nothing more. The rest of each
    answer comes with the result, so the streamed pieces add up to exactly the answer's text.
    The text a row has sent is kept on its job, so a restarted decode (which samples the same
    tokens again) sends only what is new."""

    def __init__(self, batch: list[Job], stop: list[str], decode) -> None:
        self.decode = decode
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.rows: dict[int, tuple[Job, int]] = {}  # prompt index in the call -> (job, index)
        i = 0
        for job in batch:
            for j in range(len(job.prompts)):
                if job.stream is not None and job.policy.streams and not job.cancelled:
                    self.rows[i] = (job, j)
                i += 1

    def __call__(self, step: int, rows: Any, done: np.ndarray) -> None:
        picked = [a for a in range(len(rows.prompt)) if not done[a]
                  and int(rows.prompt[a]) in self.rows]
        if not picked:
            return
        texts = self.decode([rows.tokens[a].tolist() for a in picked])
        for a, text in zip(picked, texts):
            job, j = self.rows[int(rows.prompt[a])]
            r = int(rows.sample[a])
            if r >= job.n or job.cancelled:
                continue
            safe = text[: len(text) - self.hold] if self.hold else text
            safe = safe.rstrip("\ufffd")
            sent = job.sent.get((j, r), "")
            if len(safe) > len(sent) and safe.startswith(sent):
                job.sent[(j, r)] = safe
                piece = safe[len(sent):]
                try:
                    job.loop.call_soon_threadsafe(job.stream, j, r, piece)
                except RuntimeError:  # the event loop is closed: nobody listens any more
                    pass


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
