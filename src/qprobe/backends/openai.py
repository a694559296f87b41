"""OpenAI-compatible backend: k completions per prompt from any server that speaks
`/v1/completions` or `/v1/chat/completions` (vLLM, llama.cpp server, hosted APIs).

An API gives us text, not hidden states, so the Q-probe feature comes from elsewhere:
- a local `Embedder` (the paper's API experiment embedded API generations with an open model), or
- the server's own `/v1/embeddings` (`embedder="server"`); the feature spec then says
  `layer=-1`, meaning "whatever vector the server's embedding endpoint returns" (see
  docs/api-backend.md).

HTTP is `http.HttpClient` (plain `urllib`, bounded retries, the key read per request and never
kept) plus a thread pool for bounded concurrency: no SDK dependency.

Log-probabilities: each request asks for the sampled tokens' log-probabilities (completions:
`logprobs=1`; chat: `logprobs=true`); their sum over the tokens of the kept text becomes
`Sample.logprob_sum` (and their count `Sample.num_tokens`). A server that refuses the option is
asked again without it, and one that returns none leaves both None; either is said once in the log.

`n = k`: each prompt first asks for all k samples in one request. Servers that ignore `n`
(llama-cpp-python's server) or cap it return fewer choices; the backend learns the cap and asks
for the rest in further requests, so every prompt gets exactly k samples. A server that rejects
`n > 1` outright (HTTP 400/422) is retried with `n = 1`. Each request carries a seed derived from
(params.seed, prompt text, index of its first sample), so a rerun against the same server
reproduces the same samples where the server honours `seed`.
"""

from __future__ import annotations

import logging
import threading
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from qprobe.backends.base import Embedder, LanguageModel, Sample, SamplingParams
from qprobe.backends.http import APIStatusError, HttpClient
from qprobe.errors import QProbeError
from qprobe.features import DTYPES, POSITIONS, FeatureSpec

log = logging.getLogger(__name__)

ENDPOINTS = ("completions", "chat")
SERVER_EMBEDDINGS_LAYER = -1  # FeatureSpec.layer for features from the server's /v1/embeddings


@dataclass
class OpenAIConfig:
    """Settings of the OpenAI-compatible backend (everything except the URL and the embedder)."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model name sent with each request; default: the first id the server "
                  "lists at /v1/models."},
    )
    endpoint: str = field(
        default="completions",
        metadata={"help": "'completions' (/v1/completions, raw prompt) or 'chat' "
                  "(/v1/chat/completions, the prompt as one user message)."},
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key (sent as a Bearer token; "
                  "unset or empty = no Authorization header). The key itself is never stored."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Optional system message for the chat endpoint."}
    )
    concurrency: int = field(
        default=4, metadata={"help": "Most HTTP requests in flight at once."}
    )
    timeout: float = field(
        default=120.0, metadata={"help": "Seconds to wait for one response before retrying."}
    )
    max_retries: int = field(
        default=5, metadata={"help": "Retries per request on 408/429/5xx, timeouts and "
                             "connection errors (so at most max_retries + 1 attempts)."},
    )
    backoff: float = field(
        default=0.5, metadata={"help": "Base of the exponential backoff in seconds: attempt a "
                               "waits uniform(0, backoff * 2**a), capped by max_backoff."},
    )
    max_backoff: float = field(
        default=60.0, metadata={"help": "Longest single wait, also for a server's Retry-After."}
    )
    max_n: int | None = field(
        default=None, metadata={"help": "Most completions asked for in one request (None: k; "
                                "lowered automatically when the server returns fewer)."},
    )
    max_stop: int = field(
        default=4, metadata={"help": "Stop strings sent to the server (OpenAI allows 4); all of "
                             "them are also applied to the returned text."},
    )
    embedding_model: str | None = field(
        default=None, metadata={"help": "Model name for /v1/embeddings (embedder='server'); "
                                "default: the generation model."},
    )
    embedding_batch: int = field(
        default=32, metadata={"help": "Texts per /v1/embeddings request."}
    )
    embedding_position: str = field(
        default="last", metadata={"help": "Pooling the server's embedding uses, recorded in the "
                                  "feature spec: 'last' or 'mean' (the server decides; say which)."},
    )
    feature_dtype: str = field(
        default="float16", metadata={"help": "Storage dtype recorded in the feature spec."}
    )
    logprobs: bool = field(
        default=True, metadata={"help": "Ask for the sampled tokens' log-probabilities (their sum "
                                "is recorded as logprob_sum); turned off by itself when the "
                                "server refuses them."},
    )

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise QProbeError(f"openai backend: endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if int(self.concurrency) < 1:
            raise QProbeError(f"openai backend: concurrency must be >= 1, got {self.concurrency}")
        if not (self.timeout > 0):
            raise QProbeError(f"openai backend: timeout must be > 0 seconds, got {self.timeout}")
        if int(self.max_retries) < 0:
            raise QProbeError(f"openai backend: max_retries must be >= 0, got {self.max_retries}")
        if self.max_n is not None and int(self.max_n) < 1:
            raise QProbeError(f"openai backend: max_n must be >= 1, got {self.max_n}")
        if int(self.embedding_batch) < 1:
            raise QProbeError(f"openai backend: embedding_batch must be >= 1, got {self.embedding_batch}")
        if self.embedding_position not in POSITIONS:
            raise QProbeError(f"openai backend: embedding_position must be one of {POSITIONS}, "
                              f"got {self.embedding_position!r}")
        if self.feature_dtype not in DTYPES:
            raise QProbeError(f"openai backend: feature_dtype must be one of {DTYPES}, "
                              f"got {self.feature_dtype!r}")
        if not self.api_key_env or not isinstance(self.api_key_env, str):
            raise QProbeError("openai backend: api_key_env must name an environment variable")


# ----------------------------------------------------------------------------- backend


def request_seed(seed: int, prompt: str, first_sample: int) -> int:
    """Seed of the request whose first sample is `first_sample` of `prompt` (31-bit, stable)."""
    return zlib.crc32(f"{int(seed)}:{first_sample}:".encode() + prompt.encode()) & 0x7FFFFFFF


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; returns (text, whether it was cut)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _about_logprobs(status: int, detail: str) -> bool:
    """An error that names log-probabilities (e.g. llama-cpp-python without logits_all: 500)."""
    return "logprob" in detail.lower()


def _token_pieces(logprobs: Any) -> list[tuple[bytes, float]] | None:
    """(bytes, log-prob) per completion token of a choice's `logprobs`, in either form:
    completions {"tokens", "token_logprobs"}, or chat / llama.cpp {"content": [{"token",
    "logprob", "bytes"}]}. None when absent or malformed."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        pieces = []
        for t in logprobs["content"]:
            if not isinstance(t, dict):
                return None
            raw = t.get("bytes")
            b = bytes(raw) if isinstance(raw, list) else str(t.get("token", "")).encode()
            pieces.append((b, t.get("logprob")))
    elif isinstance(logprobs.get("tokens"), list) and isinstance(logprobs.get("token_logprobs"), list):
        pieces = [(str(t).encode(), x) for t, x in zip(logprobs["tokens"], logprobs["token_logprobs"])]
    else:
        return None
    if any(isinstance(x, bool) or not isinstance(x, int | float) for _, x in pieces):
        return None
    return [(b, float(x)) for b, x in pieces]


def kept_logprobs(logprobs: Any, kept: str) -> tuple[float, int] | None:
    """(sum of log-probs, count) of the tokens fully inside the kept text, as the local loop
    counts them: a token straddling a stop-string cut and anything after the text (the stop
    string, an EOS the server reports) are left out. None when the server gave no log-probs or
    its tokens do not spell the text."""
    pieces = _token_pieces(logprobs)
    if pieces is None:
        return None
    target = kept.encode()
    total, count, pos = 0.0, 0, 0
    for b, lp in pieces:
        if pos == len(target):
            break
        if pos + len(b) > len(target):  # straddles the cut: dropped, but must agree with the text
            if not b.startswith(target[pos:]):
                return None
            return total, count
        if target[pos : pos + len(b)] != b:
            return None
        total, count, pos = total + lp, count + 1, pos + len(b)
    return (total, count) if pos == len(target) else None


def pool_embedding(emb: Any, position: str, where: str) -> np.ndarray:
    """One server embedding -> float32 [dim].

    Most servers pool and return one vector per input. llama.cpp serving a causal LM without a
    pooling type returns one vector per token ([tokens, dim], the final normed hidden states);
    those are pooled here as `position` says: the last token's row, or the mean over tokens.
    """
    arr = np.asarray(emb, dtype=np.float32) if isinstance(emb, list) and emb else None
    if arr is None or arr.ndim not in (1, 2) or arr.size == 0:
        raise QProbeError(f"POST {where}/embeddings: expected a vector (or per-token vectors) "
                          "per input")
    if arr.ndim == 2:  # [tokens, dim]
        arr = arr[-1] if position == "last" else arr.mean(axis=0)
    return arr


class OpenAIBackend(LanguageModel):
    """A `LanguageModel` served over the OpenAI HTTP API.

    max_batch_rows: rows (prompts x k) `collect` hands one `sample` call; requests go out
    `concurrency` at a time whatever the batch, so this only sets the shard size.

    base_url: `http(s)://host:port` (then `/v1` is appended) or the full API root, e.g.
              `https://api.example.com/v1`.
    embedder: None (samples carry no features), a local `Embedder`, or "server" for the
              server's `/v1/embeddings`.
    **kw: fields of `OpenAIConfig` (model, endpoint, api_key_env, concurrency, timeout, ...).
    """

    def __init__(self, base_url: str, embedder: Embedder | str | None = None, **kw: Any) -> None:
        known = {f.name for f in fields(OpenAIConfig)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise QProbeError(f"openai backend: unknown option(s) {unknown}; known: {sorted(known)}")
        self.config = OpenAIConfig(**kw)
        if not (embedder is None or embedder == "server" or isinstance(embedder, Embedder)):
            raise QProbeError(f"openai backend: embedder must be None, 'server' or an Embedder, "
                              f"got {embedder!r}")
        self.embedder = embedder
        self.max_batch_rows = 128
        c = self.config
        self.http = HttpClient(base_url, c.api_key_env, c.timeout, c.max_retries, c.backoff,
                               c.max_backoff)
        self.base_url = self.http.base_url
        self._model = c.model
        self._n_cap: int | None = c.max_n
        self._spec: FeatureSpec | None = None
        self._lock = threading.Lock()
        self._logprobs = c.logprobs  # switched off when the server refuses them
        self._said: set[str] = set()  # log lines said once
        self.requests_sent = 0  # completion requests (for progress reports and tests)
        # Tokens generated, as the server's `usage` reports them (Sample.token_ids stays empty:
        # APIs return text, not token ids), for tokens/s in progress reports.
        self.completion_tokens = 0

    def __repr__(self) -> str:
        emb = self.embedder if isinstance(self.embedder, (str, type(None))) else type(self.embedder).__name__
        return (f"OpenAIBackend({self.base_url!r}, model={self._model!r}, "
                f"endpoint={self.config.endpoint!r}, api_key_env={self.config.api_key_env!r}, "
                f"embedder={emb!r})")

    # -- identity

    @property
    def model(self) -> str:
        """The model name sent with requests (asked from /v1/models once if not given)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    listing = self.http.request("GET", "/models")
                    data = listing.get("data") if isinstance(listing, dict) else None
                    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
                        raise QProbeError(f"GET {self.base_url}/models listed no model; "
                                          "pass the model name explicitly")
                    self._model = str(data[0]["id"])
        return self._model

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.model

    @property
    def chat(self) -> bool:
        """True when prompts go to /v1/chat/completions as user messages (recorded in meta)."""
        return self.config.endpoint == "chat"

    @property
    def feature_spec(self) -> FeatureSpec | None:
        if self.embedder is None:
            return None
        if isinstance(self.embedder, Embedder):
            return self.embedder.feature_spec
        if self._spec is None:
            dim = self._embed_server(["qprobe: embedding size probe"]).shape[1]
            self._spec = FeatureSpec(model=self.config.embedding_model or self.model,
                                     layer=SERVER_EMBEDDINGS_LAYER,
                                     position=self.config.embedding_position, dim=int(dim),
                                     dtype=self.config.feature_dtype)
        return self._spec

    # -- sampling

    def _say_once(self, message: str) -> None:
        with self._lock:
            if message in self._said:
                return
            self._said.add(message)
        log.warning("%s", message)

    def _body(self, prompt: str, n: int, params: SamplingParams, seed: int,
              logprobs: bool) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.model,
            "n": n,
            "max_tokens": int(params.max_new_tokens),
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "seed": seed,
        }
        if params.top_k:  # not in OpenAI's API; vLLM and llama.cpp servers read it
            body["top_k"] = int(params.top_k)
        if params.ignore_eos:  # likewise
            body["ignore_eos"] = True
        if params.stop:
            body["stop"] = list(params.stop)[: self.config.max_stop]
        if self.config.endpoint == "chat":
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            body["messages"] = messages
            if logprobs:
                body["logprobs"], body["top_logprobs"] = True, 0
            return "/chat/completions", body
        body["prompt"] = prompt
        if logprobs:
            body["logprobs"] = 1
        return "/completions", body

    def _request(self, prompt: str, n: int, params: SamplingParams, first: int) -> list[Sample]:
        """One completion request asking for n samples; returns the samples it got (maybe < n)."""
        asked = self._logprobs
        path, body = self._body(prompt, n, params, request_seed(params.seed, prompt, first), asked)
        with self._lock:
            self.requests_sent += 1
        try:
            out = self.http.request("POST", path, body, fatal=_about_logprobs if asked else None)
        except APIStatusError as e:
            rejected = e.status in (400, 422)
            if asked and (_about_logprobs(e.status, str(e)) or (rejected and n == 1)):
                with self._lock:
                    self._logprobs = False
                self._say_once(f"{self.base_url + path} refused logprobs (HTTP {e.status}); asking "
                               "without them: logprob_sum stays empty")
                return []
            if n > 1 and rejected:  # some servers reject n > 1: ask one at a time
                log.warning("%s rejected n=%d (HTTP %d); asking for one completion per request",
                            self.base_url + path, n, e.status)
                with self._lock:
                    self._n_cap = 1
                return []
            raise
        choices = out.get("choices") if isinstance(out, dict) else None
        if not isinstance(choices, list):
            raise QProbeError(f"POST {self.base_url}{path}: answer has no 'choices' list")
        usage = out.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            with self._lock:
                self.completion_tokens += usage["completion_tokens"]
        choices = sorted(choices, key=lambda ch: ch.get("index", 0) if isinstance(ch, dict) else 0)
        samples = []
        for ch in choices[:n]:
            if self.config.endpoint == "chat":
                text = ((ch.get("message") or {}).get("content")) or ""
            else:
                text = ch.get("text") or ""
            text, was_cut = cut_at_stop(str(text), list(params.stop))
            reason = "stop" if was_cut else ("length" if ch.get("finish_reason") == "length" else "stop")
            lp = kept_logprobs(ch.get("logprobs"), text) if asked else None
            if asked and lp is None:
                self._say_once(f"{self.base_url + path}: no usable token logprobs in the answer "
                               "(absent, or not spelling the text); logprob_sum stays empty")
            samples.append(Sample(text=text, token_ids=[], finish_reason=reason,
                                  logprob_sum=None if lp is None else lp[0],
                                  num_tokens=None if lp is None else lp[1]))
        if 0 < len(samples) < n:
            with self._lock:
                if self._n_cap is None or len(samples) < self._n_cap:
                    log.info("%s returned %d of n=%d completions; asking for at most %d per request",
                             self.base_url + path, len(samples), n, len(samples))
                    self._n_cap = len(samples)
        return samples

    def _chunks(self, first: int, count: int) -> list[tuple[int, int]]:
        """Split samples [first, first + count) into requests of at most the known n cap."""
        cap = self._n_cap or count
        return [(s, min(cap, first + count - s)) for s in range(first, first + count, cap)]

    def sample(self, prompts: list[str], k: int, params: SamplingParams) -> list[list[Sample]]:
        """k completions for each prompt (result[i][j] = sample j of prompt i), with features."""
        if int(k) < 1:
            raise QProbeError(f"openai backend: k must be >= 1, got {k}")
        if not prompts:
            return []
        _ = self.model  # resolve the model name once, before the pool starts
        got: list[dict[int, Sample]] = [{} for _ in prompts]
        empty = [0] * len(prompts)
        with ThreadPoolExecutor(max_workers=int(self.config.concurrency)) as pool:
            running: dict[Future, tuple[int, int, int]] = {}

            def submit(i: int, first: int, count: int) -> None:
                for s, n in self._chunks(first, count):
                    fut = pool.submit(self._request, prompts[i], n, params, s)
                    running[fut] = (i, s, n)

            for i in range(len(prompts)):
                submit(i, 0, int(k))
            try:
                while running:
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        i, first, n = running.pop(fut)
                        samples = fut.result()
                        for j, smp in enumerate(samples):
                            got[i][first + j] = smp
                        if len(samples) < n:
                            if not samples:
                                empty[i] += 1
                                if empty[i] > self.config.max_retries + 1:
                                    raise QProbeError(f"{self.base_url}: the server returned no "
                                                      f"completions for prompt {i} "
                                                      f"{empty[i]} times")
                            submit(i, first + len(samples), n - len(samples))
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
        result = [[g[j] for j in range(int(k))] for g in got]
        if self.embedder is not None:
            flat_prompts = [p for p, row in zip(prompts, result) for _ in row]
            flat = [s for row in result for s in row]
            feats = self.embed(flat_prompts, [s.text for s in flat])  # [N, dim]
            for s, f in zip(flat, feats):
                s.feature = f
        return result

    # -- features

    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Features of (prompt, completion) pairs from the configured embedder: float32 [N, dim]."""
        if len(prompts) != len(completions):
            raise QProbeError(f"openai backend: {len(prompts)} prompts but {len(completions)} completions")
        if self.embedder is None:
            raise QProbeError("openai backend: no embedder configured (pass embedder=an Embedder "
                              "or 'server')")
        if not prompts:
            return np.zeros((0, self.feature_spec.dim), dtype=np.float32)
        if isinstance(self.embedder, Embedder):
            feats = np.asarray(self.embedder.embed(prompts, completions), dtype=np.float32)
        else:
            feats = self._embed_server([p + c for p, c in zip(prompts, completions)])
        spec = self.feature_spec
        if feats.shape != (len(prompts), spec.dim):
            raise QProbeError(f"openai backend: embedder returned features {feats.shape}, "
                              f"expected ({len(prompts)}, {spec.dim})")
        return feats

    def _embed_server(self, texts: list[str]) -> np.ndarray:
        """POST /v1/embeddings in batches (concurrently); float32 [len(texts), dim]."""
        model = self.config.embedding_model or self.model
        position = self.config.embedding_position
        size = int(self.config.embedding_batch)
        batches = [texts[s : s + size] for s in range(0, len(texts), size)]

        def one(batch: list[str]) -> list[np.ndarray]:
            out = self.http.request("POST", "/embeddings", {"model": model, "input": batch})
            data = out.get("data") if isinstance(out, dict) else None
            if not isinstance(data, list) or len(data) != len(batch):
                raise QProbeError(f"POST {self.base_url}/embeddings: expected {len(batch)} "
                                  f"embeddings, got {len(data) if isinstance(data, list) else 'none'}")
            data = sorted(data, key=lambda d: d.get("index", 0))
            return [pool_embedding(d.get("embedding"), position, self.base_url) for d in data]

        with ThreadPoolExecutor(max_workers=int(self.config.concurrency)) as pool:
            rows = [v for vecs in pool.map(one, batches) for v in vecs]
        dims = {v.shape[0] for v in rows}
        if len(dims) != 1:
            raise QProbeError(f"POST {self.base_url}/embeddings: vectors of different sizes {sorted(dims)}")
        feats = np.stack(rows).astype(np.float32, copy=False)  # [N, dim]
        if not np.isfinite(feats).all():
            raise QProbeError(f"POST {self.base_url}/embeddings: non-finite values in embeddings")
        return feats


def load_model(base_url: str, **kw: Any) -> OpenAIBackend:
    """The backend registry's entry: `OpenAIBackend(base_url, **kw)`."""
    return OpenAIBackend(base_url, **kw)
