"""The OpenAI-compatible backend against a real server on loopback.

The server is llama-cpp-python's (`python -m llama_cpp.server`, requirements-test.txt) serving
the embedded SmolLM2-135M-Instruct GGUF with an API key. Failures (429, 503, hangs, dropped
connections, servers that reject n > 1) come from `FaultProxy`, a small real HTTP server in
front of it. Completions are kept short (a few tokens) so the module runs in well under a minute.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import pytest

from llama_server import (
    EMBED_ALIAS,
    MODEL_ALIAS,
    NO_LOGPROBS_ALIAS,
    FaultProxy,
    LlamaServer,
    free_port,
)
from qprobe.backends.base import SamplingParams
from qprobe.backends.http import APIStatusError, normalize_base_url, parse_retry_after
from qprobe.backends.openai import (
    OpenAIBackend,
    OpenAIConfig,
    cut_at_stop,
    kept_logprobs,
    request_seed,
)
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec

KEY_ENV = "QPROBE_TEST_API_KEY"
KEY = "sk-test-" + secrets.token_hex(12)  # fresh per run: any occurrence in output is a leak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LlamaServer(tmp_path_factory.mktemp("llama"), api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def proxy_factory(server):
    made = []

    def make(**kw) -> FaultProxy:
        p = FaultProxy(server.url, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def backend(url: str, **kw) -> OpenAIBackend:
    kw.setdefault("model", MODEL_ALIAS)
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(url, **kw)


def params(**kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("temperature", 1.0)
    kw.setdefault("top_p", 0.95)
    return SamplingParams(**kw)


# ----------------------------------------------------------------------------- sampling


def test_completions_k_per_prompt_with_n_fallback(proxy_factory):
    proxy = proxy_factory()
    be = backend(proxy.url)
    out = be.sample(["The sky is", "def add(a, b):"], k=3, params=params(seed=1))
    assert [len(row) for row in out] == [3, 3]
    for row in out:
        for s in row:
            assert isinstance(s.text, str) and s.finish_reason in ("stop", "length")
            assert s.feature is None and s.token_ids == []
    posts = proxy.posts("/v1/completions")
    # n = k first; llama-cpp-python's server ignores n (one choice), so the backend learns the
    # cap and asks for the remaining 2 samples of each prompt one request at a time.
    assert sorted(p["body"]["n"] for p in posts) == [1, 1, 1, 1, 3, 3]
    assert be.requests_sent == 6
    assert 0 < be.completion_tokens <= 6 * 6  # the server's usage counts, max_tokens=6 each
    assert all(p["auth"] == f"Bearer {KEY}" for p in proxy.seen)
    assert {p["body"]["max_tokens"] for p in posts} == {6}
    # every sample of a prompt came from its own seed
    assert len({p["body"]["seed"] for p in posts}) == 6


def test_model_name_defaults_to_the_servers_first_model(server):
    be = OpenAIBackend(server.url, api_key_env=KEY_ENV)
    assert be.name == MODEL_ALIAS


def test_seeded_samples_reproduce(server):
    be = backend(server.url)
    prompts = ["Once upon a time"]
    a = be.sample(prompts, k=3, params=params(seed=7))
    b = be.sample(prompts, k=3, params=params(seed=7))
    c = be.sample(prompts, k=3, params=params(seed=8))
    texts = lambda out: [s.text for s in out[0]]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # different samples of one prompt differ


def test_chat_endpoint(proxy_factory):
    proxy = proxy_factory()
    be = backend(proxy.url, endpoint="chat", system_prompt="Answer briefly.")
    out = be.sample(["What is 2 + 2?"], k=2, params=params(seed=3))
    assert len(out[0]) == 2 and all(isinstance(s.text, str) for s in out[0])
    posts = proxy.posts("/v1/chat/completions")
    assert posts and posts[0]["body"]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    assert not proxy.posts("/v1/completions")


def test_stop_sequences_cut_the_text(proxy_factory):
    proxy = proxy_factory()
    be = backend(proxy.url)
    prompt = "Fruits: apple, banana, cherry,"
    greedy = params(temperature=0.0, max_new_tokens=12)
    full = be.sample([prompt], k=1, params=greedy)[0][0].text
    assert len(full) >= 4, full
    stop = full[2:4]  # a string the greedy completion contains; cut before its first occurrence
    expected = full[: full.find(stop)]

    got = be.sample([prompt], k=1, params=params(temperature=0.0, max_new_tokens=12, stop=[stop]))
    assert got[0][0].text == expected and got[0][0].finish_reason == "stop"
    assert proxy.posts("/v1/completions")[-1]["body"]["stop"] == [stop]

    # more stop strings than the server takes (max_stop): the extra ones still cut, client side
    many = ["\x01", "\x02", "\x03", "\x04", stop]
    got = be.sample([prompt], k=1, params=params(temperature=0.0, max_new_tokens=12, stop=many))
    assert got[0][0].text == expected and got[0][0].finish_reason == "stop"
    assert proxy.posts("/v1/completions")[-1]["body"]["stop"] == many[:4]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_is_bounded(proxy_factory, concurrency):
    # concurrency 1: each request is held 0.3 s, a second one sent meanwhile would be counted;
    # concurrency 3: requests are held until 3 are in flight, so the bound is also reached.
    proxy = proxy_factory(delay_s=0.3) if concurrency == 1 else proxy_factory(gate=concurrency)
    be = backend(proxy.url, concurrency=concurrency, max_n=1)
    out = be.sample(["a", "b", "c", "d"], k=2, params=params(max_new_tokens=2))
    assert [len(r) for r in out] == [2, 2, 2, 2]
    assert len(proxy.posts("/v1/completions")) == 8
    assert proxy.max_inflight == concurrency


def test_server_rejecting_n_falls_back_to_one_per_request(proxy_factory):
    proxy = proxy_factory(reject_n=True)
    be = backend(proxy.url)
    out = be.sample(["Hello"], k=3, params=params(max_new_tokens=3))
    assert len(out[0]) == 3
    actions = [(p["body"]["n"], p["action"]) for p in proxy.posts("/v1/completions")]
    assert actions[0] == (3, "reject_n")
    assert sorted(actions[1:]) == [(1, "pass")] * 3


# ----------------------------------------------------------------------------- failures


def test_retries_on_429_5xx_drops_and_timeouts(proxy_factory, caplog):
    # The timeout must also cover the real server's answer on a loaded machine: 3 s, hang 6 s.
    proxy = proxy_factory(script=[429, 503, "drop", "hang", 500], hang_s=6.0)
    be = backend(proxy.url, timeout=3.0, max_retries=5, max_n=1)
    with caplog.at_level(logging.WARNING, logger="qprobe.backends.openai"):
        out = be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    assert len(out[0]) == 1
    assert {r.name for r in caplog.records} == {"qprobe.backends.openai.http"}
    assert [p["action"] for p in proxy.seen] == [429, 503, "drop", "hang", 500, "pass"]
    assert "HTTP 429" in caplog.text and "HTTP 503" in caplog.text
    assert "no answer within 3 s" in caplog.text
    assert KEY not in caplog.text


def test_retry_after_is_honoured(proxy_factory):
    proxy = proxy_factory(script=[(429, "7"), (503, "120")])
    be = backend(proxy.url, max_backoff=30.0, max_n=1)
    waits: list[float] = []
    be.http._sleep = waits.append  # record instead of sleeping
    be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    assert waits == [7.0, 30.0]  # the server's Retry-After, capped at max_backoff


def test_retries_are_bounded(proxy_factory):
    proxy = proxy_factory(script=[503, 503, 503, 503])
    be = backend(proxy.url, max_retries=2, max_n=1)
    with pytest.raises(QProbeError, match=r"failed after 3 attempt\(s\): HTTP 503") as e:
        be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    assert proxy.url in str(e.value) and KEY not in str(e.value)
    assert len(proxy.seen) == 3


def test_wrong_or_missing_key_is_a_clear_401(server, monkeypatch):
    be = backend(server.url)
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-123")
    with pytest.raises(APIStatusError) as e:
        be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    msg = str(e.value)
    assert e.value.status == 401 and "HTTP 401" in msg and server.url + "/v1/" in msg
    assert "sk-wrong-key-123" not in msg and KEY not in msg
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(APIStatusError, match="HTTP 401"):
        be.sample(["Hi"], k=1, params=params(max_new_tokens=2))


def test_wrong_path_is_a_clear_404(server):
    be = backend(server.url + "/nope/v1")
    with pytest.raises(APIStatusError, match=r"/nope/v1/completions -> HTTP 404") as e:
        be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    assert e.value.status == 404


def test_unreachable_server():
    be = backend(f"http://127.0.0.1:{free_port()}", max_retries=1)
    with pytest.raises(QProbeError, match=r"failed after 2 attempt\(s\)"):
        be.sample(["Hi"], k=1, params=params())


def test_key_is_never_stored_or_shown(server):
    be = backend(server.url, embedder="server", embedding_model=EMBED_ALIAS)
    be.sample(["Hi"], k=1, params=params(max_new_tokens=2))
    shown = [repr(be), repr(vars(be)), repr(vars(be.http)), repr(be.config),
             repr(be.feature_spec)]
    assert not any(KEY in s for s in shown)
    assert be.config.api_key_env == KEY_ENV


# ----------------------------------------------------------------------------- log-probabilities


def test_logprobs_are_summed_over_the_kept_tokens(proxy_factory):
    """Each request asks for logprobs; logprob_sum / num_tokens cover exactly the tokens of the
    kept text, whether the server or the client cut it at the stop string."""
    proxy = proxy_factory()
    be = backend(proxy.url)
    prompt = "Fruits: apple, banana, cherry,"
    full = be.sample([prompt], k=1, params=params(temperature=0.0, max_new_tokens=12))[0][0]
    assert proxy.posts("/v1/completions")[-1]["body"]["logprobs"] == 1
    assert full.logprob_sum < 0 and full.num_tokens >= 4 and full.token_ids == []
    stop = full.text[len(full.text) // 2 :][:2]
    expected = full.text[: full.text.find(stop)]
    by_server = be.sample([prompt], 1, params(temperature=0.0, max_new_tokens=12, stop=[stop]))
    client_side = ["\x01", "\x02", "\x03", "\x04", stop]  # only the first 4 reach the server
    by_client = be.sample([prompt], 1, params(temperature=0.0, max_new_tokens=12, stop=client_side))
    a, b = by_server[0][0], by_client[0][0]
    assert a.text == b.text == expected
    assert a.num_tokens == b.num_tokens < full.num_tokens
    assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
    assert a.logprob_sum > full.logprob_sum  # fewer (negative) terms


def test_server_logprobs_are_the_models_own(server):
    """The sum equals the log-likelihood of the text under the same GGUF re-encoded by
    transformers (temperature 1, no top-p), up to llama.cpp's quantised arithmetic."""
    import torch

    from qprobe.backends import load_model

    be = backend(server.url)
    prompts = ["The capital of France is", "def add(a, b):"]
    out = be.sample(prompts, k=2, params=params(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=4))
    lm = load_model("default", chat=False, features=False)
    checked = 0
    for prompt, group in zip(prompts, out):
        p_ids = lm.tok.prompt_ids(prompt)
        for s in group:
            c_ids = lm.tok.completion_ids(s.text)
            if len(c_ids) != s.num_tokens:  # the server sampled a non-canonical tokenisation
                continue
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
            pos = torch.arange(len(p_ids) - 1, ids.shape[1] - 1)
            ref = float(logp[pos, ids[0, len(p_ids):]].sum())
            # llama.cpp runs the Q4_1 weights with quantised activations: per token it differs
            # from the fp32 re-encoding by up to ~0.2 here; a shift by one token, by several.
            assert s.logprob_sum == pytest.approx(ref, abs=0.1 + 0.1 * len(c_ids))
            checked += 1
    assert checked >= 2


def test_chat_endpoint_asks_for_logprobs(proxy_factory):
    proxy = proxy_factory()
    be = backend(proxy.url, endpoint="chat")
    out = be.sample(["What is 2 + 2?"], k=1, params=params(seed=3))
    body = proxy.posts("/v1/chat/completions")[-1]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 0
    s = out[0][0]
    assert (s.logprob_sum is None) == (s.num_tokens is None)
    if s.text:
        assert s.logprob_sum is not None and s.logprob_sum < 0 and s.num_tokens >= 1


def test_a_server_without_logprobs_leaves_them_empty_and_says_so_once(server, proxy_factory,
                                                                      caplog):
    """A server that refuses logprobs (llama-cpp-python without logits_all: HTTP 500) is asked
    again without them; one that ignores them returns none. Either way the sums stay None and
    the log says so once."""
    proxy = proxy_factory()
    be = backend(proxy.url, model=NO_LOGPROBS_ALIAS, max_n=1)
    with caplog.at_level(logging.WARNING, logger="qprobe.backends.openai"):
        out = be.sample(["Hi", "Yo"], k=2, params=params(max_new_tokens=3))
    assert all(s.logprob_sum is None and s.num_tokens is None for g in out for s in g)
    assert caplog.text.count("refused logprobs") == 1
    actions = [("logprobs" in p["body"], p["action"]) for p in proxy.posts("/v1/completions")]
    assert actions[0] == (True, "pass") and actions[-4:] == [(False, "pass")] * 4
    assert len(actions) <= 4 + be.config.concurrency  # no retries of a refused option

    caplog.clear()
    stripped = proxy_factory(strip_logprobs=True)
    be = backend(stripped.url, max_n=1)
    with caplog.at_level(logging.WARNING, logger="qprobe.backends.openai"):
        out = be.sample(["Hi", "Yo"], k=2, params=params(max_new_tokens=3))
    assert all(s.logprob_sum is None for g in out for s in g)
    assert caplog.text.count("no usable token logprobs") == 1
    off = backend(server.url, logprobs=False)
    assert off.sample(["Hi"], k=1, params=params(max_new_tokens=2))[0][0].logprob_sum is None


# ----------------------------------------------------------------------------- features


def test_features_from_server_embeddings(server):
    be = backend(server.url, embedder="server", embedding_model=EMBED_ALIAS, embedding_batch=2)
    spec = be.feature_spec
    assert spec == FeatureSpec(model=EMBED_ALIAS, layer=-1, position="last", dim=576,
                               dtype="float16")
    out = be.sample(["The capital of France is", "2 + 2 ="], k=2, params=params(seed=5))
    feats = np.stack([s.feature for row in out for s in row])  # [4, 576]
    assert feats.shape == (4, 576) and feats.dtype == np.float32 and np.isfinite(feats).all()
    # the feature is the embedding of prompt + completion: recomputing it gives the same vector
    again = be.embed(["2 + 2 ="], [out[1][0].text])  # [1, 576]
    np.testing.assert_allclose(again[0], feats[2], rtol=1e-4, atol=1e-4)
    assert be.embed([], []).shape == (0, 576) and be.sample([], k=2, params=params()) == []
    other = be.embed(["2 + 2 ="], [out[1][0].text + " and more words"])
    assert not np.allclose(other[0], feats[2], atol=1e-3)
    # mean pooling of the same per-token vectors is a different feature (and spec)
    mean = backend(server.url, embedder="server", embedding_model=EMBED_ALIAS,
                   embedding_position="mean")
    assert mean.feature_spec.position == "mean"
    assert not np.allclose(mean.embed(["2 + 2 ="], [out[1][0].text])[0], feats[2], atol=1e-3)


def test_features_from_a_local_embedder(server):
    """API generations embedded by a local transformers model (the paper's API setup): here the
    tiny random model of tiny_lm.py through the real HFEmbedder."""
    from qprobe.backends.hf import HFEmbedder
    from tiny_lm import build_model, build_tokenizer

    emb = HFEmbedder(build_model(seed=3), build_tokenizer(), identity="tiny-llama", layer=1,
                     position="last")
    be = backend(server.url, embedder=emb)
    assert be.feature_spec == emb.feature_spec
    prompts = ["Say A", "Bee bee"]
    out = be.sample(prompts, k=2, params=params(max_new_tokens=4, seed=11))
    feats = np.stack([s.feature for row in out for s in row])  # [4, 64]
    assert feats.shape == (4, 64) and np.isfinite(feats).all()
    # each sample carries the feature of its own (prompt, completion) pair
    direct = emb.embed([p for p in prompts for _ in range(2)], [s.text for row in out for s in row])
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)


def test_collect_into_a_rollout_store_and_resume(server, proxy_factory, tmp_path):
    """`collect` with the API backend writes a valid rollouts folder; a rerun sends nothing."""
    import json

    from qprobe.collect import CollectConfig, collect
    from qprobe.rollouts import Rollouts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["Hello,", "One, two,", "Red, green,"])))
    cfg = CollectConfig(out=str(tmp_path / "rollouts"), task=str(prompts), model=server.url,
                        k=2, max_new_tokens=4, batch_prompts=2, progress=False)
    proxy = proxy_factory()
    be = backend(proxy.url, embedder="server", embedding_model=EMBED_ALIAS)
    summary = collect(cfg, lm=be)
    assert summary["rows"] == 6 and summary["new_rows"] == 6
    r = Rollouts(cfg.out)
    assert r.feature_spec.layer == -1 and r.features.shape == (6, 576)
    assert sorted(zip(r.column("prompt_id"), r.column("sample_idx"))) == [
        (f"p{i}", j) for i in range(3) for j in range(2)]
    assert r.meta["model"] == MODEL_ALIAS and KEY not in json.dumps(r.meta)
    # the API gives text and log-probs, not token ids
    assert r.column("token_ids") == [None] * 6 and all(x <= 0 for x in r.column("logprob_sum"))
    assert all(n >= 0 for n in r.column("num_tokens"))
    sent = len(proxy.posts("/v1/completions"))
    again = collect(cfg, lm=be)
    assert again["new_rows"] == 0 and len(proxy.posts("/v1/completions")) == sent


# ----------------------------------------------------------------------------- pure helpers


def test_helpers_without_a_server():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    assert normalize_base_url("http://h:1/openai/v1") == "http://h:1/openai/v1"
    for bad in ["file:///etc/passwd", "ftp://h/v1", "http://user:pw@h/v1", "http://h/v1?key=x", "h:8000"]:
        with pytest.raises(QProbeError):
            normalize_base_url(bad)
    assert parse_retry_after("3") == 3.0 and parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert cut_at_stop("a\nb```c", ["```", "\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    completions = {"tokens": ["He", "llo", ",", " you"], "token_logprobs": [-1.0, -0.5, -0.25, -2.0]}
    assert kept_logprobs(completions, "Hello, you") == (-3.75, 4)
    assert kept_logprobs(completions, "Hello,") == (-1.75, 3)  # " you": after the cut
    assert kept_logprobs(completions, "Hello, y") == (-1.75, 3)  # " you" straddles the cut
    assert kept_logprobs(completions, "Help") is None  # the tokens do not spell the text
    assert kept_logprobs(completions, "Hello, you and more") is None
    assert kept_logprobs(None, "x") is None and kept_logprobs({"tokens": []}, "") is None
    chat = {"content": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                        {"token": "<|im_end|>", "logprob": -0.1, "bytes": list(b"<|im_end|>")}]}
    assert kept_logprobs(chat, "é") == (-0.5, 1)  # an end token after the text is not counted
    assert kept_logprobs({"content": []}, "") == (0.0, 0)
    assert request_seed(0, "p", 0) != request_seed(0, "p", 1) != request_seed(1, "p", 1)
    assert request_seed(3, "p", 2) == request_seed(3, "p", 2) < 2**31
    with pytest.raises(QProbeError, match="endpoint"):
        OpenAIConfig(endpoint="embeddings")
    with pytest.raises(QProbeError, match="unknown option"):
        OpenAIBackend("http://127.0.0.1:1", modle="x")
    with pytest.raises(QProbeError, match="embedder"):
        OpenAIBackend("http://127.0.0.1:1", embedder="local")
