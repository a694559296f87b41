"""`qprobe serve`: an OpenAI-compatible server whose every answer is a policy's (best of k with a
probe, guided decoding, an adapter, ...; see docs/serve.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args
from qprobe.defaults import MAX_NEW_TOKENS, TEMPERATURE, TOP_P

KEY_ENV = "QPROBE_API_KEY"


@dataclass
class ServeOptions:
    model: str = field(default="default", metadata={
        "show_default": False,
        "help": "model: 'default' (embedded SmolLM2-135M), a .gguf, a folder, or an http(s):// "
                "OpenAI-compatible server (then --embedder computes the features)"})
    backend: str | None = field(default=None, metadata={
        "help": "backend: hf or openai (default: openai for an http(s):// --model, else hf)"})
    policy: list[str] = field(default_factory=list, metadata={
        "action": "append", "metavar": "NAME=SPEC",
        "help": "a policy, served as model '{name}:{NAME}' (repeatable): SPEC is "
                "KIND[:key=value,...], kinds sample, greedy, best-of-k (probe=, k=, beta=), "
                "logprob (reduce=mean|sum, k=), guided (head=, beta=, top_k=, inverse=), "
                "qadapter / dpo (adapter=); the first policy (--probe ones first) is also "
                "served as '{name}'"})
    probe: list[str] = field(default_factory=list, metadata={
        "action": "append", "metavar": "[NAME=]PROBE_DIR",
        "help": "a trained probe: short for --policy NAME=best-of-k:probe=PROBE_DIR with --k "
                "and --beta (repeatable; NAME defaults to the folder's name)"})
    name: str | None = field(default=None, metadata={
        "help": "served base model id (default: the model file or folder name; for an API "
                "model, its model id)"})
    embedder: str | None = field(default=None, metadata={
        "help": "local model computing the features when --model is an API server"})
    device: str | None = field(default=None, metadata={
        "help": "cpu / cuda for the local model and embedder (default: cuda if any)"})
    upstream_model: str | None = field(default=None, metadata={
        "help": "model id sent to an upstream server (default: the first it lists)"})
    upstream_endpoint: str = field(default="completions", metadata={
        "choices": ["completions", "chat"],
        "help": "upstream endpoint: completions (raw prompt) or chat (prompt as a user message)"})
    upstream_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the upstream server's key"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; anything but loopback exposes the server to the network"})
    port: int = field(default=8000, metadata={"help": "port (0: any free port)"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' (default: ${KEY_ENV} if set; prefer the "
                "variable: a flag is visible to other users in the process list)"})
    k: int = field(default=8, metadata={"help": "--probe: candidates per request unless it "
                                         "asks (k, best_of)"})
    max_k: int = field(default=64, metadata={"help": "largest k a request may ask for"})
    beta: float | None = field(default=None, metadata={
        "help": "--probe: selection temperature unless the request asks; 0 = argmax (default: "
                "the probe's beta)"})
    max_beta: float = field(default=100.0, metadata={"help": "largest beta a request may ask"})
    temperature: float = field(default=TEMPERATURE, metadata={
        "help": "sampling temperature unless the request asks (the probe's training setting)"})
    top_p: float = field(default=TOP_P, metadata={"help": "nucleus mass unless the request asks"})
    max_tokens: int = field(default=MAX_NEW_TOKENS, metadata={
        "help": "tokens per completion unless the request asks"})
    max_tokens_limit: int = field(default=2048, metadata={
        "help": "largest max_tokens a request may ask for"})
    max_queue: int = field(default=64, metadata={
        "help": "requests waiting at most; more get 429 with Retry-After"})
    max_batch: int = field(default=32, metadata={"help": "prompts decoded together at most"})
    batch_wait_ms: float = field(default=10.0, metadata={
        "help": "longest a batch waits for requests still arriving (being read) to join it; "
                "a lone request starts at once"})
    timeout: float = field(default=600.0, metadata={
        "help": "seconds a request may take, queue included (then 504)"})
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request body (then 413)"})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0: torch's default; 1 is faster on a crowded machine)"})
    log_requests: bool = field(default=False, metadata={
        "action": "store_true", "help": "log prompts and chosen completions (off by default)"})
    log_level: str = field(default="info", metadata={
        "choices": ["debug", "info", "warning", "error"], "help": "server log level"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve policies (probes, guided decoding, adapters) behind an OpenAI-compatible API",
        description="Serve MODEL with one or more policies as an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions): each is a served model id, e.g. the best of k "
        "samples by a probe (softmax(Q/beta), argmax at beta 0) or reward-guided decoding, "
        "streamed token by token. Needs the 'serve' extra (starlette, uvicorn). See "
        "docs/serve.md.",
    )
    add_flags(p, ServeOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.errors import QProbeError

    o = from_args(ServeOptions, args)
    try:
        import uvicorn

        from qprobe.serve.app import ServeLimits, build_app
        from qprobe.serve.batcher import Batcher
    except ImportError as e:
        raise QProbeError(f"serve: {e.name} is not installed; pip install 'qprobe[serve]'") from None
    from qprobe.serve.models import load_served

    for name, v, lo in (("k", o.k, 1), ("max-k", o.max_k, 1), ("max-queue", o.max_queue, 0),
                        ("max-batch", o.max_batch, 1), ("max-tokens", o.max_tokens, 1),
                        ("max-body-bytes", o.max_body_bytes, 1)):
        if v < lo:
            raise QProbeError(f"serve: --{name} must be >= {lo}, got {v}")
    if o.k > o.max_k:
        raise QProbeError(f"serve: --k {o.k} is above --max-k {o.max_k}")
    if o.max_tokens > o.max_tokens_limit:
        raise QProbeError(f"serve: --max-tokens {o.max_tokens} is above --max-tokens-limit "
                          f"{o.max_tokens_limit}")
    if not (o.timeout > 0) or o.batch_wait_ms < 0:
        raise QProbeError("serve: --timeout must be > 0 and --batch-wait-ms >= 0")
    api_key = o.api_key or os.environ.get(KEY_ENV) or None
    logging.basicConfig(level=o.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("qprobe.serve")
    from qprobe.backends.http import is_loopback_host

    if not is_loopback_host(o.host) and not api_key:
        log.warning("binding %s without an API key: anyone who can reach it can use it", o.host)

    if o.threads < 0:
        raise QProbeError(f"serve: --threads must be >= 0, got {o.threads}")
    if o.threads:
        import torch

        torch.set_num_threads(o.threads)
    upstream = {"model": o.upstream_model, "endpoint": o.upstream_endpoint,
                "api_key_env": o.upstream_key_env}
    if not o.policy and not o.probe:
        raise QProbeError("serve: give at least one --policy NAME=SPEC or --probe PROBE_DIR")
    served = load_served(o.model, o.policy, probe_args=o.probe, k=o.k, beta=o.beta,
                         backend=o.backend, embedder=o.embedder, base=o.name, upstream=upstream,
                         device=o.device)
    limits = ServeLimits(max_k=o.max_k, max_beta=o.max_beta,
                         temperature=o.temperature, top_p=o.top_p, max_tokens=o.max_tokens,
                         max_tokens_limit=o.max_tokens_limit, max_body_bytes=o.max_body_bytes,
                         timeout_s=o.timeout, log_requests=o.log_requests)
    batcher = Batcher(max_queue=o.max_queue, max_batch=o.max_batch,
                      wait_s=o.batch_wait_ms / 1000.0)
    app = build_app(served, limits, api_key=api_key, batcher=batcher)
    config = uvicorn.Config(app, host=o.host, port=o.port, log_level=o.log_level,
                            access_log=o.log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    print(f"qprobe serve: models {', '.join(served.ids())} "
          f"(auth {'on' if api_key else 'off'})", file=sys.stderr, flush=True)
    server.run()
    return 0
