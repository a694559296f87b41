"""The OpenAI-compatible HTTP API (Starlette): routes, request checking, errors, streaming.

    GET  /health                 liveness and queue counters (no key needed, no prompts)
    GET  /v1/models              the served ids: `{base}` and `{base}:{name}` per policy
    POST /v1/completions         prompt (a string or a list of strings) -> the policy's answer
    POST /v1/chat/completions    one user message -> the policy's answer as the assistant reply

Every request is answered by the policy its `model` names (`serve/models.py`): best-of-k with a
probe (k candidates, scores Q, choice by softmax(Q/beta)), log-likelihood reranking, the model's
own samples, guided decoding, an adapter. Extension fields: `k`, `beta` (for the kinds that have
them, bounded by the server's limits; `best_of` is read as k) and `policy`, a spec of the
options a request may set ('beta=2,top_k=10'). `n` returns n answers: of a best-of-k policy, the
choice first, then the rest of the k by descending score; of a per-token policy, n samples.
The response's `qprobe` field holds, per prompt, every candidate's score and selection weight
(when the policy scores), the chosen index and which candidates the returned choices are;
`usage.completion_tokens` counts every candidate drawn.

Streaming: a per-token policy's answer is streamed as it is decoded (`batcher.StreamRows`); a
best-of-k answer can only be sent once every candidate is scored.

Errors are OpenAI-style bodies {"error": {"message", "type", "param", "code"}}: 400 a bad field,
401 a missing or wrong key, 404 an unknown model or path, 413 an oversized body, 429 a full queue
(with Retry-After), 504 past the per-request timeout. No request can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qprobe.backends.base import SamplingParams
from qprobe.serve.batcher import Batcher, Job, QueueFull, SamplingKey

log = logging.getLogger("qprobe.serve")


@dataclass
class ServeLimits:
    """Defaults and bounds applied to every request (the `qprobe serve` flags)."""

    max_k: int = 64
    max_beta: float = 100.0
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    max_tokens_limit: int = 2048
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0
    log_requests: bool = False


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# Fields accepted only at their neutral value: anything else changes what the client expects.
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
                "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
                "response_format": (None, {"type": "text"})}


def _number(body: dict, name: str, default: Any, lo: float, hi: float, integer: bool = False
            ) -> Any:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}", param=name)
    return int(v) if integer else float(v)


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if (not isinstance(items, list) or len(items) > 8
            or not all(isinstance(s, str) and s for s in items)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 8 of them",
                       param="stop")
    return tuple(items)


@dataclass
class Parsed:
    model_id: str
    served: Any  # models.ServedPolicy
    policy: Any  # its Policy with this request's options
    prompts: list[str]
    key: SamplingKey
    n: int
    stream: bool
    include_usage: bool


def _chat_prompt(messages: Any) -> str:
    """The prompt of a chat request: its one user message (the probe scores (prompt, reply))."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message must be an object with a 'role'", param="messages")
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise APIError(400, "qprobe serve takes exactly one user message per chat request (the "
                       "probe scores a completion of one prompt); put the context in it",
                       param="messages")
    content = messages[0].get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, "only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, "the user message's 'content' must be a string", param="messages")
    return content


class ServeApp:
    """The state behind the routes: served models, the batcher, limits, the key."""

    def __init__(self, served: Any, limits: ServeLimits, api_key: str | None,
                 batcher: Batcher) -> None:
        self.served, self.limits, self.batcher = served, limits, batcher
        self._key = ("Bearer " + api_key).encode() if api_key else None
        self.created = int(time.time())

    # -- checks

    def check_auth(self, request: Request) -> None:
        if self._key is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, self._key):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks, n = [], 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise APIError(413, f"request body over {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "client disconnected") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def parse(self, body: dict, chat: bool) -> Parsed:
        L = self.limits
        model_id = body.get("model")
        if not isinstance(model_id, str):
            raise APIError(400, "'model' is required (GET /v1/models lists them)", param="model")
        served = self.served.get(model_id)
        if served is None:
            raise APIError(404, f"model {model_id!r} is not served here; served: "
                           f"{', '.join(self.served.ids())}", param="model",
                           code="model_not_found")
        for name, neutral in _UNSUPPORTED.items():
            if name in body and body[name] not in neutral:
                raise APIError(400, f"'{name}' is not supported by qprobe serve", param=name)
        if chat:
            prompts = [_chat_prompt(body.get("messages"))]
        else:
            p = body.get("prompt")
            prompts = [p] if isinstance(p, str) else p
            if (not isinstance(prompts, list) or not prompts
                    or not all(isinstance(x, str) for x in prompts)):
                raise APIError(400, "'prompt' must be a string or a non-empty list of strings "
                               "(token ids are not supported)", param="prompt")
            if len(prompts) > L.max_prompts:
                raise APIError(400, f"at most {L.max_prompts} prompts per request",
                               param="prompt")
        policy = self._options(served.policy, body)
        cfg = policy.cfg
        n = _number(body, "n", 1, 1, L.max_k, integer=True)
        if hasattr(cfg, "k") and n > cfg.k:
            raise APIError(400, f"'n' ({n}) must be at most k ({cfg.k}): n of the k candidates are "
                           "returned", param="n")
        temperature = _number(body, "temperature", L.temperature, 0, 2)
        top_p = _number(body, "top_p", L.top_p, 1e-6, 1)
        tok_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = _number(body, tok_name, L.max_tokens, 1, L.max_tokens_limit, integer=True)
        seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", param="stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = bool((opts or {}).get("include_usage", False))
        stop = _stop(body)
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extra parameter
        if not isinstance(ignore_eos, bool):
            raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos")
        params = policy.sampling(SamplingParams(temperature=temperature, top_p=top_p,
                                                max_new_tokens=max_tokens, stop=list(stop),
                                                ignore_eos=ignore_eos))
        key = SamplingKey(sampler=policy.sampler_id, k=policy.draws(n),
                          temperature=params.temperature, top_p=params.top_p,
                          max_tokens=max_tokens, stop=stop, seed=seed, ignore_eos=ignore_eos)
        return Parsed(model_id, served, policy, prompts, key, n, stream, include_usage)

    def _options(self, policy: Any, body: dict) -> Any:
        """The served policy with the request's options: `policy` (a spec of the options a
        request may set), `k` / `best_of` and `beta` for the kinds that have them."""
        from qprobe.policy.registry import request_options
        from qprobe.policy.specs import SpecError

        L = self.limits
        cfg = policy.cfg
        spec = body.get("policy")
        if spec is not None:
            try:
                cfg = request_options(policy, spec)
            except SpecError as e:
                raise APIError(400, str(e), param="policy") from None
        changes: dict[str, Any] = {}
        best_of = _number(body, "best_of", None, 1, L.max_k, integer=True)
        k = _number(body, "k", best_of, 1, L.max_k, integer=True)
        beta = _number(body, "beta", None, 0, L.max_beta)
        for name, v in (("k", k), ("beta", beta)):
            if v is None:
                continue
            if not hasattr(cfg, name):
                raise APIError(400, f"'{name if name != 'k' or 'k' in body else 'best_of'}' does "
                               f"not apply to a {policy.kind!r} policy", param=name)
            changes[name] = v
        if getattr(cfg, "k", 1) > L.max_k:
            raise APIError(400, f"'k' must be at most {L.max_k}", param="k")
        if getattr(cfg, "beta", None) is not None and cfg.beta > L.max_beta:
            raise APIError(400, f"'beta' must be at most {L.max_beta:g}", param="beta")
        if changes:
            cfg = dataclasses.replace(cfg, **changes)
        return policy if cfg == policy.cfg else policy.with_config(cfg)

    # -- running

    def enqueue(self, p: Parsed, pieces: asyncio.Queue | None = None) -> Job:
        """Queue the request (429 when the queue is full); `pieces` gets (prompt, answer,
        text) for each piece of text decided while it decodes (streaming)."""
        loop = asyncio.get_running_loop()
        job = Job(prompts=p.prompts, key=p.key, policy=p.policy, future=loop.create_future(),
                  loop=loop, n=p.n, stream=None if pieces is None else (
                      lambda j, r, text: pieces.put_nowait((j, r, text))))
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, "the server is busy: its queue is full; retry later",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job

    async def wait(self, request: Request, job: Job) -> Any:
        """The queued request's result; cancel it on disconnect or timeout."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=self.limits.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        finally:
            gone.cancel()
        if job.future in done:
            exc = job.future.exception()
            if exc is not None:
                log.warning("request failed: %s", type(exc).__name__)
                raise APIError(500, f"generation failed: {_one_line(exc)}", type_="server_error")
            return job.future.result()
        self.batcher.cancel(job)
        if gone in done:
            raise _ClientGone()
        raise APIError(504, f"no answer within the server's timeout of {self.limits.timeout_s:g} s",
                       type_="timeout_error", code="timeout")

    def body(self, p: Parsed, result: Any, chat: bool, rid: str) -> dict:
        choices, extension = [], []
        n_tokens = 0
        for i, ans in enumerate(result.answers):
            returned = ans.order()[: p.n]
            for r, j in enumerate(returned):
                text, fin = ans.samples[j].text, ans.samples[j].finish_reason
                c: dict[str, Any] = {"index": i * p.n + r, "finish_reason": fin,
                                     "logprobs": None}
                if chat:
                    c["message"] = {"role": "assistant", "content": text}
                else:
                    c["text"] = text
                choices.append(c)
            n_tokens += sum(int(s.num_tokens or 0) for s in ans.samples)
            extension.append({"chosen": ans.chosen, "returned": returned,
                              "scores": _finite(ans.scores), "weights": ans.weights})
            if self.limits.log_requests:
                log.info("prompt %r -> %r (candidate %d of %d)", ans.prompt, ans.text,
                         ans.chosen, len(ans.samples))
        prompt_tokens = result.prompt_tokens
        ext: dict[str, Any] = {"policy": p.served.name, "kind": p.policy.kind, "k": p.key.k}
        if "probe" in p.policy.needs:
            ext["probe"] = p.served.name
        beta = getattr(p.policy, "beta", getattr(p.policy.cfg, "beta", None))
        if beta is not None:
            ext["beta"] = beta
        ext.update({"seed": result.seed, "batch_requests": result.batch_requests,
                    "queue_ms": round(result.queued_s * 1e3, 3),
                    "batch_ms": round(result.batch_s * 1e3, 3), "results": extension})
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": p.model_id,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                      "total_tokens": prompt_tokens + n_tokens},
            "qprobe": ext,
        }

    async def complete(self, request: Request, chat: bool) -> Response:
        # While this request is read and checked, the batcher may wait for it (a few ms at
        # most) rather than start a batch without it.
        self.batcher.arriving()
        pieces: asyncio.Queue | None = None
        try:
            self.check_auth(request)
            p = self.parse(await self.read_json(request), chat)
            if p.stream and p.policy.streams:  # tokens are sent as they are decided
                pieces = asyncio.Queue()
            job = self.enqueue(p, pieces)  # before any streaming starts: a full queue is a 429
        finally:
            self.batcher.arrived()
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        if not p.stream:
            return JSONResponse(self.body(p, await self.wait(request, job), chat, rid))
        task = asyncio.ensure_future(self.wait(request, job))
        return StreamingResponse(self._events(p, task, pieces, chat, rid),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, p: Parsed, task: asyncio.Future, pieces: asyncio.Queue | None,
                      chat: bool, rid: str):
        """SSE. A per-token policy: each answer's text as it is decoded (`pieces`), then the
        rest of it and its finish; best-of-k: comments while the k candidates are made, then the
        chosen text. Then a last chunk with the `qprobe` field (and usage if asked)."""
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": p.model_id}
        sent: dict[int, str] = {}  # choice index -> text sent so far

        def content(i: int, text: str) -> list[bytes]:
            out = []
            if chat and i not in sent:
                out.append(_sse({**base, "choices": [{"index": i, "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None,
                    "logprobs": None}]}))
            sent[i] = sent.get(i, "") + text
            if text:
                delta = {"delta": {"content": text}} if chat else {"text": text}
                out.append(_sse({**base, "choices": [{"index": i, **delta,
                                                      "finish_reason": None,
                                                      "logprobs": None}]}))
            return out

        def drain() -> list[bytes]:
            out = []
            while pieces is not None and not pieces.empty():
                j, r, text = pieces.get_nowait()
                out += content(j * p.n + r, text)
            return out

        try:
            while not task.done():
                if pieces is None:
                    done, _ = await asyncio.wait({task}, timeout=2.0)
                    if not done:
                        yield b": waiting for the k candidates\n\n"
                    continue
                get = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({task, get}, timeout=2.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get.done() and not get.cancelled():
                    j, r, text = get.result()
                    for chunk in content(j * p.n + r, text):
                        yield chunk
                else:
                    get.cancel()
                    if not done:
                        yield b": decoding\n\n"
            for chunk in drain():
                yield chunk
            try:
                full = self.body(p, task.result(), chat, rid)
            except _ClientGone:
                return
            except APIError as e:
                err = {"error": {"message": e.message, "type": e.type, "code": e.code}}
                yield _sse(err)
                yield b"data: [DONE]\n\n"
                return
            base["created"] = full["created"]
            for c in full["choices"]:
                i = c["index"]
                text = c["message"]["content"] if chat else c["text"]
                before = sent.get(i, "")
                if not text.startswith(before):  # cannot happen (see StreamRows); say so
                    log.warning("streamed text of choice %d is not a prefix of its answer", i)
                for chunk in content(i, text[len(before):]):
                    yield chunk
                fin = {"delta": {}} if chat else {"text": ""}
                yield _sse({**base, "choices": [{"index": i, **fin,
                                                 "finish_reason": c["finish_reason"],
                                                 "logprobs": None}]})
            last = {**base, "choices": [], "qprobe": full["qprobe"]}
            if p.include_usage:
                last["usage"] = full["usage"]
            yield _sse(last)
            yield b"data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        data = [{"id": i, "object": "model", "created": self.created, "owned_by": "qprobe"}
                for i in self.served.ids()]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        b = self.batcher
        return JSONResponse({"status": "ok", "queued": b.queued(), "running": b.running,
                             **b.stats})


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body was read, the next ASGI message is the
    disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _finite(xs: list[float] | None) -> list[float | None] | None:
    """Scores for JSON: a non-finite one (an empty completion's mean log-prob) as null."""
    return None if xs is None else [x if math.isfinite(x) else None for x in xs]


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def build_app(served: Any, limits: ServeLimits | None = None, api_key: str | None = None,
              batcher: Batcher | None = None) -> Starlette:
    """The ASGI app. `batcher` defaults to one over `served` with the default queue settings."""
    limits = limits or ServeLimits()
    state = ServeApp(served, limits, api_key, batcher or Batcher())

    def route(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return e.response()
            except _ClientGone:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - one bad request never stops the server
                log.exception("internal error")
                return APIError(500, f"internal error: {type(e).__name__}",
                                type_="server_error").response()
        return endpoint

    async def not_found(request: Request, exc: HTTPException) -> Response:
        msg = "no such path" if exc.status_code == 404 else (exc.detail or "HTTP error")
        return APIError(exc.status_code, f"{msg}: {request.method} {request.url.path}",
                        code="not_found" if exc.status_code == 404 else None).response()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        state.batcher.close()

    app = Starlette(
        routes=[
            Route("/health", route(state.health), methods=["GET"]),
            Route("/v1/models", route(state.models), methods=["GET"]),
            Route("/v1/completions", route(lambda r: state.complete(r, chat=False)),
                  methods=["POST"]),
            Route("/v1/chat/completions", route(lambda r: state.complete(r, chat=True)),
                  methods=["POST"]),
        ],
        exception_handlers={HTTPException: not_found},
        lifespan=lifespan,
    )
    app.state.qprobe = state
    return app
