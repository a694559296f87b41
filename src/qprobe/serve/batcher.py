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

Continuous batching. A policy that samples a local Llama-family model plainly (best-of-k,
logprob, sample, greedy: `Policy.continuous`) runs in an open decode
(`HFLanguageModel.decode_continuous`): before every step the worker lets in the queued requests
with the same sampler and settings (any seed: each request's rows are seeded by its own seed),
while the decode's prompts stay within `max_batch`; a prompt whose k rows have ended leaves,
frees its place and its request is answered at once. A request gets exactly the samples it gets
alone, whenever it joins; no decode step is thrown away. Other policies (guided, adapters) and
upstream models run one closed batch at a time, as below.

Requests without a seed: in an open decode each draws its own seed; in a closed batch they share
one fresh seed per batch (reported in the response), so they batch together; two identical
unseeded prompts in the same closed batch therefore get the same candidates.

The queue is bounded: `submit` raises `QueueFull` (the server answers 429 with Retry-After).
A cancelled request (client gone, timeout) is dropped if it has not started. In an open decode
its rows are taken out before the next step (their places go to waiting requests); in a closed
batch they run to their end and its result is thrown away.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qprobe.backends.base import SamplingParams
from qprobe.serve.models import prompt_tokens

log = logging.getLogger("qprobe.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class SamplingKey:
    """What must match for requests to share one `sample` call."""

    sampler: str  # `Policy.sampler_id`
    k: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # None: the request (open decode) or the batch (closed) draws one
    ignore_eos: bool = False

    def open(self) -> SamplingKey:
        """What must match to join an open decode: all but the seed (each row has its own)."""
        return replace(self, seed=None)

    def params(self, seed: int = 0) -> SamplingParams:
        """The `SamplingParams` these settings sample with (`seed`: the batch's)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_tokens, stop=list(self.stop), seed=seed,
                              ignore_eos=self.ignore_eos)


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
    seed: int | None = None  # the seed it was sampled with (drawn if the request gave none)
    shared: int = 0  # most requests decoding beside it (itself included), in an open decode
    stream: Callable[[int, int, str], None] | None = None
    sent: dict[tuple[int, int], str] = field(default_factory=dict)  # text streamed per answer
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when it was taken from the queue (its decode started or it joined)


@dataclass
class Result:
    """Per prompt: the policy's Answer (its candidates, for token counts, and its choice)."""

    answers: list[Any]  # policy.base.Answer per prompt
    seed: int
    batch_requests: int  # requests that shared this request's sample call
    prompt_tokens: int  # the prompts' tokens as the model reads them (0 if unknown)
    queued_s: float  # from submit to the start of its batch (or its joining a running decode)
    batch_s: float  # from then: its sampling, scoring and choice


class Batcher:
    """A bounded queue and one worker thread sampling the policies' requests in batches.

    max_queue: most waiting requests (beyond them: QueueFull). max_batch: most prompts in one
    decode (an open decode: at any time). wait_s: how long the worker waits for more requests
    after the first, and only while other requests are arriving (`arriving()` was called for
    them and they are not yet submitted): a lone request starts at once.
    """

    def __init__(self, max_queue: int = 64, max_batch: int = 32,
                 wait_s: float = 0.010) -> None:
        self.max_queue, self.max_batch, self.wait_s = int(max_queue), int(max_batch), float(wait_s)
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self._closed = False
        self._batch_s = 1.0  # moving average of a batch's duration (Retry-After)
        # batches: decodes run (open or closed); joined: requests that entered a running decode;
        # dropped: prompts of cancelled requests taken out of a running decode
        self.stats = {"batches": 0, "requests": 0, "cancelled": 0, "max_batch_requests": 0,
                      "rejected": 0, "joined": 0, "steps": 0, "dropped": 0}
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
            first = self._queue[0]
            batch = self._pick(first.key, 0, first.policy.continuous)
            self.running = len(batch)
            return batch

    def _pick(self, key: SamplingKey, n: int, open_: bool = False) -> list[Job]:
        """Take the queued requests with `key` (open_: whatever their seed), oldest first, while
        the prompts stay within max_batch (`n` prompts already run; the first request always fits
        an empty batch). The caller holds the lock."""
        if open_:
            key = key.open()
        picked: list[Job] = []
        for job in self._queue:
            if (job.key.open() if open_ else job.key) != key or \
                    job.policy.continuous != open_:
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

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                if batch[0].policy.continuous:
                    self._run_open(batch)
                else:
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
        """A closed batch: sample, choose and deliver `batch` (one `sample` call)."""
        key = batch[0].key
        lead = batch[0].policy  # every job's policy samples as this one does (same sampler_id)
        # One seed for the batch's unseeded requests.
        seed = key.seed if key.seed is not None else secrets.randbits(31)
        params = key.params(seed)
        prompts = [p for job in batch for p in job.prompts]
        observe = None
        if any(job.stream is not None and job.policy.streams for job in batch):
            observe = StreamRows(list(key.stop), lead.decode)
            pairs = [(job, j) for job in batch for j in range(len(job.prompts))]
            for i, (job, j) in enumerate(pairs):
                observe.add(i, job, j)
        samples = lead.sample(prompts, key.k, params, observe=observe)
        self.stats["batches"] += 1
        self._count(len(batch))
        i = 0
        for job in batch:
            mine = samples[i : i + len(job.prompts)]
            i += len(job.prompts)
            self._answer(job, mine, seed, len(batch))

    def _run_open(self, batch: list[Job]) -> None:
        """An open decode (continuous batching): `batch` starts it; before every step the
        queued requests that fit join it; each request is answered when its prompts end."""
        key = batch[0].key
        lead = batch[0].policy
        params = key.params()  # each row is seeded by its own request's seed
        observe = StreamRows(list(key.stop), lead.decode)
        admitted: list[Job] = []  # not yet answered
        pending = list(batch)
        live = 0  # prompts in the decode
        n_prompts = 0  # prompts admitted so far (the observer's prompt index)
        got: dict[int, list[Any]] = {}  # id(job) -> samples per prompt

        def admit() -> list[tuple[str, int, Any]]:
            nonlocal pending, live, n_prompts
            # Cancelled requests free their places; the decode takes their rows out (`drop`).
            for job in [j for j in admitted if j.cancelled]:
                admitted.remove(job)
                live -= sum(m is None for m in got.pop(id(job)))
            jobs, pending = pending, []
            if not jobs and self._queue:  # unlocked peek; _pick runs under the lock
                with self._cv:
                    jobs = [] if self._closed else self._pick(key, live, open_=True)
                self.stats["joined"] += len(jobs)
            out = []
            for job in jobs:
                seed = job.key.seed if job.key.seed is not None else secrets.randbits(31)
                job.seed = seed
                got[id(job)] = [None] * len(job.prompts)
                for j, p in enumerate(job.prompts):
                    if job.stream is not None and job.policy.streams:
                        observe.add(n_prompts, job, j)
                    n_prompts += 1
                    out.append((p, seed, (job, j)))
                live += len(job.prompts)
                admitted.append(job)
            if jobs:
                self._count(len(jobs))
                with self._cv:
                    self.running = len(admitted)
                for job in admitted:
                    job.shared = max(job.shared, len(admitted))
            return out

        def deliver(tag: tuple[Job, int], samples: list[Any]) -> None:
            nonlocal live
            job, j = tag
            mine = got.get(id(job))
            if mine is None:  # cancelled and already counted out by `admit`
                return
            live -= 1
            mine[j] = samples
            if all(m is not None for m in mine):
                admitted.remove(job)
                with self._cv:
                    self.running = len(admitted)
                self._answer(job, mine, job.seed, job.shared)

        try:
            stats = lead.model.decode_continuous(key.k, params, admit, deliver, observe=observe,
                                                 drop=lambda tag: tag[0].cancelled)
            self.stats["steps"] += stats["steps"]
            self.stats["dropped"] += stats.get("dropped", 0)
        except BaseException:
            batch[:] = admitted  # `_work` delivers the failure to every request not answered
            raise
        self.stats["batches"] += 1

    def _count(self, n: int) -> None:
        self.stats["requests"] += n
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], n)

    def _answer(self, job: Job, samples: list[list[Any]], seed: int, shared: int) -> None:
        """Choose by the job's own policy and deliver (nothing for a cancelled job)."""
        if job.cancelled:
            return
        try:
            rng = np.random.default_rng(seed)  # as the library's generate(seed=seed) would
            answers = job.policy.choose(job.prompts, samples, [rng] * len(job.prompts))
            # tokenised here: the tokenizer is not safe to share across threads
            n_prompt = sum(prompt_tokens(job.policy.model, p) for p in job.prompts)
            _deliver(job, result=Result(answers, seed, shared, n_prompt,
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
    `add(i, job, j)`: the decode's prompt i is prompt j of `job`."""

    def __init__(self, stop: list[str], decode) -> None:
        self.decode = decode
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.rows: dict[int, tuple[Job, int]] = {}  # prompt index in the decode -> (job, j)

    def add(self, i: int, job: Job, j: int) -> None:
        self.rows[i] = (job, j)

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
