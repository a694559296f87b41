"""`qprobe serve` against the real `openai` client.

A tiny random model and a probe trained here (on the model's own features, rewarding vowels)
are saved to disk; one `qprobe serve` subprocess on loopback serves them (with an API key) for
the whole module. The queue behaviours that need the model held still (batching, 429, timeouts,
disconnects) run against the same app in this process, on loopback too, over a model whose
`sample` waits on a gate. The upstream case puts the llama.cpp server of the API tests behind
`qprobe serve` with the tiny model as embedder.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from llama_server import free_port  # noqa: E402
from qprobe.backends import SamplingParams, load_model  # noqa: E402
from qprobe.policy import (  # noqa: E402
    best_of_k,  # noqa: E402
    registry,
    specs,
)
from qprobe.policy.loading import ModelContext  # noqa: E402
from qprobe.probe import Probe  # noqa: E402
from qprobe.serve.app import ServeLimits, build_app  # noqa: E402
from qprobe.serve.batcher import Batcher  # noqa: E402
from qprobe.serve.models import ServedModels, ServedPolicy  # noqa: E402
from qprobe.train import TrainConfig, train_probe  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

KEY = "sk-serve-" + secrets.token_hex(8)
MAX_TOKENS = 8
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def vowels(text: str) -> float:
    return sum(c in "aeiouAEIOU" for c in text) / max(len(text), 1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny model (folder and loaded), a trained probe and a random one, saved to disk."""
    root = tmp_path_factory.mktemp("serve")
    folder = save_tiny(root / "model")
    model = load_model(str(folder), layer=1)
    prompts = [f"{a} {b}" for a in ("ab", "cd", "ef", "gh") for b in ("x", "yz", "w")]
    samples = model.sample(prompts, 4, SamplingParams(max_new_tokens=MAX_TOKENS, seed=1))
    flat = [s for g in samples for s in g]
    feats = np.stack([s.feature for s in flat]).astype(np.float32)  # [48, 64]
    rewards = np.array([vowels(s.text) for s in flat], dtype=np.float32)  # [48]
    groups = np.repeat(np.arange(len(prompts)), 4)
    cfg = TrainConfig(objective="q", lr=1e-2, epochs=30, min_steps=200, beta=0.1)
    good, _ = train_probe(feats, rewards, groups, config=cfg, feature_spec=model.feature_spec,
                          data_fingerprint=False)
    good_dir = good.save(root / "good")
    rand = Probe(model.feature_spec.dim, beta=0.5, objective="q", feature_spec=model.feature_spec)
    with torch.no_grad():
        rand.net[-1].weight.copy_(torch.randn(rand.net[-1].weight.shape,
                                              generator=torch.Generator().manual_seed(0)))
    rand_dir = rand.save(root / "rand")
    return {"folder": folder, "model": model, "good": Probe.load(good_dir), "good_dir": good_dir,
            "rand": Probe.load(rand_dir), "rand_dir": rand_dir, "root": root}


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with _NO_PROXY.open(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post_raw(url: str, data: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _NO_PROXY.open(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class ServeProcess:
    """`python -m qprobe serve ...` on a free loopback port, stopped at teardown."""

    def __init__(self, args: list[str], log_path, env: dict | None = None,
                 ready_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qprobe", "serve", *args, "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})})
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"qprobe serve exited with {self.proc.returncode}:\n"
                                   + self.log())
            try:
                if _get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("qprobe serve not ready:\n" + self.log())

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def server(assets):
    srv = ServeProcess(["--model", str(assets["folder"]), "--probe", f"good={assets['good_dir']}",
                        "--probe", f"rand={assets['rand_dir']}", "--name", "tiny",
                        "--max-tokens", str(MAX_TOKENS), "--k", "4", "--max-k", "16",
                        "--max-body-bytes", "65536", "--batch-wait-ms", "5", "--threads", "1"],
                       assets["root"] / "serve.log", env={"QPROBE_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def library_choice(assets, probe: str, prompt: str, k: int, beta: float, seed: int, **kw):
    params = SamplingParams(max_new_tokens=kw.get("max_tokens", MAX_TOKENS), seed=seed)
    return best_of_k(assets["model"], assets[probe], prompt, k=k, beta=beta, params=params,
                     seed=seed)


# ----------------------------------------------------------------------------- the subprocess


def test_models_health_and_auth(server, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:good", "tiny:rand"]
    assert _get(server.url + "/health")[0] == 200  # no key needed, no prompts in it
    for key in ("wrong-key", None):
        status, body = _get(server.url + "/v1/models", key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="ab")
    assert KEY not in server.log()


@pytest.mark.parametrize("probe,beta,seed", [("good", 0.0, 5), ("rand", 0.5, 11),
                                             ("good", 0.1, 3)])
def test_served_choice_is_the_librarys_best_of_k(server, client, assets, probe, beta,
                                                 seed) -> None:
    r = client.completions.create(model=f"tiny:{probe}", prompt="ab x", max_tokens=MAX_TOKENS,
                                  seed=seed, extra_body={"k": 5, "beta": beta})
    lib = library_choice(assets, probe, "ab x", 5, beta, seed)
    ext = r.model_extra["qprobe"]
    assert ext["k"] == 5 and ext["beta"] == beta and ext["seed"] == seed and ext["probe"] == probe
    res = ext["results"][0]
    np.testing.assert_allclose(res["scores"], lib.scores, rtol=1e-4, atol=1e-4)
    assert res["chosen"] == lib.chosen and r.choices[0].text == lib.text
    assert len(r.choices) == 1 and res["returned"] == [lib.chosen]
    assert abs(sum(res["weights"]) - 1) < 1e-9
    # usage counts all k candidates' tokens, the prompt once
    samples = assets["model"].sample(["ab x"], 5, SamplingParams(max_new_tokens=MAX_TOKENS,
                                                                 seed=seed))[0]
    assert r.usage.completion_tokens == sum(len(s.token_ids) for s in samples)
    assert r.usage.prompt_tokens == len(assets["model"].tok.prompt_ids("ab x"))


def test_trained_probe_prefers_vowels(client) -> None:
    """The trained probe's argmax choice has more vowels on average than the first sample."""
    chosen, first = [], []
    for i in range(6):
        r = client.completions.create(model="tiny:good", prompt=f"q{i} ", seed=i,
                                      extra_body={"k": 8, "beta": 0, "n": 8})
        texts = [c.text for c in r.choices]
        chosen.append(vowels(texts[0]))
        first.append(np.mean([vowels(t) for t in texts]))
    assert np.mean(chosen) > np.mean(first)


def test_n_best_of_and_prompt_lists(client) -> None:
    r = client.completions.create(model="tiny:rand", prompt="cd", n=3, seed=2,
                                  extra_body={"k": 6, "beta": 0.5})
    res = r.model_extra["qprobe"]["results"][0]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(res["scores"]) == 6
    assert res["returned"][0] == res["chosen"]  # the policy's choice first, then by Q
    rest = [res["scores"][j] for j in res["returned"][1:]]
    others = sorted((s for j, s in enumerate(res["scores"]) if j != res["chosen"]), reverse=True)
    assert rest == others[:2]
    r = client.completions.create(model="tiny", prompt="cd", best_of=3, seed=2)
    assert r.model_extra["qprobe"]["k"] == 3 and r.model_extra["qprobe"]["probe"] == "good"
    r = client.completions.create(model="tiny:good", prompt=["ab", "cd x"], n=2, seed=4,
                                  extra_body={"k": 3})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and len(r.model_extra["qprobe"]["results"]) == 2
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model="tiny", prompt="cd", n=5, extra_body={"k": 4})
    r = client.completions.create(model="tiny", prompt="cd", max_tokens=5, seed=2,
                                  extra_body={"ignore_eos": True})  # vLLM's extra parameter
    assert r.usage.completion_tokens == 5 * r.model_extra["qprobe"]["k"]  # all k candidates


def test_chat_and_streaming(client, assets) -> None:
    msgs = [{"role": "user", "content": "ef w"}]
    r = client.chat.completions.create(model="tiny:good", messages=msgs, seed=7,
                                       extra_body={"k": 4, "beta": 0})
    lib = library_choice(assets, "good", "ef w", 4, 0.0, 7)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == lib.text
    assert r.object == "chat.completion" and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="tiny:good", messages=msgs, seed=7, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"k": 4, "beta": 0})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == lib.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].model_extra["qprobe"]["results"][0]["chosen"] == lib.chosen
    stream = client.completions.create(model="tiny:good", prompt="ef w", seed=7, stream=True,
                                       extra_body={"k": 4, "beta": 0})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == lib.text
    assert all(c.usage is None for c in chunks)  # usage only when asked
    with pytest.raises(openai.BadRequestError, match="one user message"):
        client.chat.completions.create(model="tiny", messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


def test_errors_are_openai_json_and_the_server_survives(server, client) -> None:
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="tiny:nope", prompt="ab")
    for kw in ({"temperature": 7}, {"extra_body": {"k": 0}}, {"extra_body": {"k": 17}},
               {"extra_body": {"beta": -1}}, {"max_tokens": 0}, {"logprobs": 2},
               {"extra_body": {"k": "many"}}, {"top_p": 0}, {"extra_body": {"ignore_eos": "yes"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="ab", **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    url = server.url + "/v1/completions"
    assert _post_raw(url, b"{not json")[0] == 400
    assert _post_raw(url, b"[1, 2]")[0] == 400
    assert _post_raw(url, json.dumps({"model": "tiny", "prompt": [1, 2]}).encode())[0] == 400
    status, body = _post_raw(url, json.dumps({"model": "tiny", "prompt": "a" * 70000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="a" * 70000)
    assert e.value.status_code == 413
    assert _post_raw(url, b'{"model": "tiny", "prompt": "ab"}', key=None)[0] == 401
    assert _get(server.url + "/v2/nothing", KEY)[0] == 404
    assert client.completions.create(model="tiny", prompt="still alive").choices[0].text is not None
    assert server.proc.poll() is None


def test_concurrent_requests_for_two_probes(server, client) -> None:
    """Requests for different probes in flight together (they may share a decode batch)."""
    out: list = [None] * 6

    def one(i: int) -> None:
        out[i] = client.completions.create(model="tiny:good" if i % 2 else "tiny:rand",
                                           prompt=f"p{i}", extra_body={"k": 4})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r.choices) == 1 for r in out)
    assert [r.model_extra["qprobe"]["probe"] for r in out] == ["rand", "good"] * 3


# ----------------------------------------------------------------------------- in process


class GatedModel:
    """The tiny model, whose `sample` waits until the gate opens; records the prompts sampled."""

    def __init__(self, model) -> None:
        self.inner, self.gate, self.sampled = model, threading.Event(), []
        self.entered = threading.Event()
        self.name, self.chat = model.name, model.chat
        self.feature_spec, self.max_batch_rows, self.tok = (model.feature_spec,
                                                            model.max_batch_rows, model.tok)

    def sample(self, prompts, k, params):
        self.entered.set()
        self.gate.wait(30)
        self.sampled.extend(prompts)
        return self.inner.sample(prompts, k, params)


class HeldModel:
    """The tiny model with its open decode (continuous batching): in the first decode, the
    admission before step `hold_at` waits until the gate opens. Records, per decode, the prompts
    admitted before each step."""

    continuous = True

    def __init__(self, model, hold_at: int) -> None:
        self.inner, self.hold_at, self.decodes = model, hold_at, []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.name, self.chat = model.name, model.chat
        self.feature_spec, self.max_batch_rows, self.tok = (model.feature_spec,
                                                            model.max_batch_rows, model.tok)

    def sample(self, prompts, k, params, **kw):
        return self.inner.sample(prompts, k, params, **kw)

    def decode_continuous(self, k, params, admit, deliver, observe=None, drop=None):
        first = not self.decodes
        admits: list[list[str]] = []
        self.decodes.append(admits)

        def held():
            if first and len(admits) == self.hold_at:
                self.entered.set()
                self.gate.wait(30)
            got = admit()
            admits.append([p for p, _, _ in got])
            return got

        return self.inner.decode_continuous(k, params, held, deliver, observe, drop=drop)


def _serve_inproc(model, assets, batcher_kw: dict, limits: ServeLimits):
    """Serve `model` with the good probe (k = 3) in this process on loopback (no API key)."""
    policy = registry.build_config("best-of-k", specs.BestOfKSpec(str(assets["good_dir"]), k=3),
                                   ModelContext(loaded=model))
    served = ServedModels("tiny", [ServedPolicy("tiny:good", "good", "", policy)])
    batcher = Batcher(**batcher_kw)
    app = build_app(served, limits, api_key=None, batcher=batcher)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)

    def stop() -> None:
        model.gate.set()
        srv.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", batcher, stop


@pytest.fixture
def inproc(assets):
    """The app in this process on loopback, no API key, a gated model, a queue of 1, 3 s timeout."""
    gated = GatedModel(assets["model"])
    url, batcher, stop = _serve_inproc(gated, assets, dict(max_queue=1, max_batch=8, wait_s=0.0),
                                       ServeLimits(max_tokens=MAX_TOKENS, timeout_s=3.0))
    yield url, gated, batcher
    stop()


@pytest.fixture
def held(assets, request):
    """The app over a `HeldModel` holding its first decode before step 3 (of MAX_TOKENS = 8);
    request.param: the server's max_batch (default 8)."""
    model = HeldModel(assets["model"], 3)
    url, batcher, stop = _serve_inproc(
        model, assets, dict(max_queue=8, max_batch=getattr(request, "param", 8), wait_s=0.0),
        ServeLimits(max_tokens=MAX_TOKENS, timeout_s=60.0))
    yield url, model, batcher
    stop()


def _bg(fn, results: dict, name: str) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - inspected by the test
            results[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_queue_full_disconnect_and_timeout(inproc) -> None:
    url, gated, batcher = inproc
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    got: dict = {}
    a = _bg(lambda: c.completions.create(model="tiny", prompt="A"), got, "a")
    assert gated.entered.wait(10)  # A is being decoded (held at the gate)
    # B waits in the queue, then its client gives up: the server drops B unsampled.
    quick = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
    b = _bg(lambda: quick.completions.create(model="tiny", prompt="B"), got, "b")
    b.join()
    assert isinstance(got["b"], openai.APITimeoutError)
    _until(lambda: batcher.queued() == 0 and batcher.stats["cancelled"] == 1)
    # C fills the queue (1); D finds it full: 429 with Retry-After.
    cc = _bg(lambda: c.completions.create(model="tiny", prompt="C"), got, "c")
    _until(lambda: batcher.queued() == 1)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="tiny", prompt="D")
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "queue_full"
    # A (running) and C (queued) pass the 3 s timeout: 504 each.
    a.join()
    cc.join()
    for name in ("a", "c"):
        assert isinstance(got[name], openai.APIStatusError) and got[name].status_code == 504
    gated.gate.set()
    r = c.completions.create(model="tiny", prompt="E", extra_body={"k": 2})  # no key needed
    assert len(r.model_extra["qprobe"]["results"][0]["scores"]) == 2
    assert "B" not in gated.sampled and "D" not in gated.sampled and "E" in gated.sampled


def test_requests_arriving_together_are_decoded_together(inproc, assets) -> None:
    url, gated, batcher = inproc
    batcher.max_queue = 8
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    got: dict = {}
    first = _bg(lambda: c.completions.create(model="tiny", prompt="first"), got, "first")
    assert gated.entered.wait(10)
    ts = [_bg(lambda i=i: c.completions.create(model="tiny", prompt=f"p{i}", seed=9,
                                               extra_body={"beta": 0}), got, f"p{i}")
          for i in range(4)]
    _until(lambda: batcher.queued() == 4)
    gated.gate.set()
    for t in [first, *ts]:
        t.join()
    for i in range(4):
        r = got[f"p{i}"]
        assert r.model_extra["qprobe"]["batch_requests"] == 4  # one sample call for the four
        lib = library_choice(assets, "good", f"p{i}", 3, 0.0, 9)
        assert r.choices[0].text == lib.text  # batching does not change the answer
    _until(lambda: batcher.stats["batches"] == 2)  # counted once the batch has returned


def test_requests_join_a_running_decode_and_get_the_samples_they_get_alone(held, assets):
    """Three requests queued while a decode is at step 3 join it before step 4, each with its own
    seed, and each answer is the library's answer for that request alone; a request with other
    settings (k) waits for the next decode. No step is thrown away: one decode, then one more."""
    url, model, batcher = held
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    got: dict = {}

    def ask(name: str, seed: int, k: int = 3):
        return _bg(lambda: c.completions.create(model="tiny", prompt=name, seed=seed,
                                                extra_body={"beta": 0, "k": k}), got, name)

    first = ask("first", 9)
    assert model.entered.wait(10)  # "first" has decoded 3 steps and waits before the 4th
    ts = [ask("p0", 9), ask("p1", 4), ask("p2", 7), ask("other", 4, k=2)]
    _until(lambda: batcher.queued() == 4)
    model.gate.set()
    for t in [first, *ts]:
        t.join()
    admits = model.decodes[0]
    assert admits[:3] == [["first"], [], []] and sorted(admits[3]) == ["p0", "p1", "p2"]
    assert model.decodes[1][0] == ["other"]
    for name, seed, k in [("first", 9, 3), ("p0", 9, 3), ("p1", 4, 3), ("p2", 7, 3),
                          ("other", 4, 2)]:
        r = got[name]
        lib = library_choice(assets, "good", name, k, 0.0, seed)
        assert r.choices[0].text == lib.text  # joining does not change the answer
        assert r.model_extra["qprobe"]["results"][0]["chosen"] == lib.chosen
        assert r.model_extra["qprobe"]["seed"] == seed
    # a decode is counted when it returns, which can be just after its last answer went out
    _until(lambda: batcher.stats["batches"] == 2 and batcher.stats["requests"] == 5)
    assert batcher.stats["joined"] == 3
    status, health = _get(url + "/health")
    assert status == 200 and health["joined"] == 3


def test_unseeded_requests_get_their_own_seeds_in_an_open_decode(held, assets):
    url, model, batcher = held
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    got: dict = {}
    first = _bg(lambda: c.completions.create(model="tiny", prompt="same",
                                             extra_body={"beta": 0}), got, "a")
    assert model.entered.wait(10)
    late = _bg(lambda: c.completions.create(model="tiny", prompt="same",
                                            extra_body={"beta": 0}), got, "b")
    _until(lambda: batcher.queued() == 1)
    model.gate.set()
    first.join()
    late.join()
    assert batcher.stats["joined"] == 1 and len(model.decodes) == 1
    for name in ("a", "b"):
        seed = got[name].model_extra["qprobe"]["seed"]
        assert got[name].choices[0].text == library_choice(assets, "good", "same", 3, 0.0,
                                                           seed).text


@pytest.mark.parametrize("held", [1], indirect=True)
def test_a_prompt_that_ends_frees_its_place_for_a_queued_one(held, assets):
    """With room for one prompt, a request queued while another decodes joins the same decode
    as soon as the running prompt's rows have ended (not a new decode after it)."""
    url, model, batcher = held
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    got: dict = {}
    first = _bg(lambda: c.completions.create(model="tiny", prompt="first", seed=1), got, "a")
    assert model.entered.wait(10)
    late = _bg(lambda: c.completions.create(model="tiny", prompt="late", seed=2), got, "b")
    _until(lambda: batcher.queued() == 1)
    model.gate.set()
    first.join()
    late.join()
    admits = model.decodes[0]
    assert len(model.decodes) == 1 and admits[3] == []  # no room while "first" runs
    at = next(i for i, a in enumerate(admits) if a == ["late"])
    _until(lambda: batcher.stats["batches"] == 1)  # counted when the decode returns
    assert at > 3 and batcher.stats["joined"] == 1 and len(model.decodes) == 1
    assert got["b"].choices[0].text == library_choice(assets, "good", "late", 3, 0.1, 2).text


def test_a_cancelled_request_leaves_a_running_decode(held, assets):
    """A client that gives up while its request decodes: the server cancels it, its rows are
    taken out before the next step (counted as dropped), and a request that joins then gets
    the library's answer."""
    url, model, batcher = held
    quick = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    got: dict = {}
    first = _bg(lambda: quick.completions.create(model="tiny", prompt="first", seed=1), got, "a")
    assert model.entered.wait(10)  # "first" decodes, held before its 4th step
    first.join()
    assert isinstance(got["a"], openai.APITimeoutError)
    _until(lambda: batcher.stats["cancelled"] == 1)
    late = _bg(lambda: c.completions.create(model="tiny", prompt="late", seed=2), got, "b")
    _until(lambda: batcher.queued() == 1)
    model.gate.set()
    late.join()
    _until(lambda: batcher.stats["batches"] == 1)
    assert batcher.stats["dropped"] == 1 and len(model.decodes) == 1
    assert got["b"].choices[0].text == library_choice(assets, "good", "late", 3, 0.1, 2).text


# ----------------------------------------------------------------------------- upstream


def test_upstream_mode_on_the_module_server(server, assets, monkeypatch) -> None:
    """An API model: the module's server is the upstream (it is OpenAI-compatible), features
    come from a local embedder; served in this process on loopback."""
    from qprobe.serve.models import load_served

    monkeypatch.setenv("QPROBE_TEST_UPSTREAM_KEY", KEY)
    served = load_served(server.url, [], probe_args=[f"good={assets['good_dir']}"], k=3,
                         embedder=str(assets["folder"]),
                         upstream={"model": "tiny:rand", "api_key_env": "QPROBE_TEST_UPSTREAM_KEY",
                                   "backoff": 0.01, "max_retries": 1})
    assert served.ids() == ["tiny-rand", "tiny-rand:good"]
    app = build_app(served, ServeLimits(max_tokens=MAX_TOKENS), api_key=None)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        _until(lambda: srv.started)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                          timeout=60)
        r = c.completions.create(model="tiny-rand:good", prompt="gh w", n=3, seed=4,
                                 extra_body={"beta": 0})
        res = r.model_extra["qprobe"]["results"][0]
        assert len(res["scores"]) == 3 and res["chosen"] == int(np.argmax(res["scores"]))
        texts = [ch.text for ch in r.choices]  # candidates returned[0..2]
        feats = assets["model"].embedder().embed(["gh w"] * 3, texts)
        want = assets["good"].score(feats)
        got = [res["scores"][j] for j in res["returned"]]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        assert r.usage.prompt_tokens == 0  # the upstream's tokenizer is not known here
    finally:
        srv.should_exit = True
        thread.join(timeout=10)



@pytest.mark.slow
def test_upstream_server_with_local_embedder(assets, tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from llama_server import MODEL_ALIAS, LlamaServer

    upstream_key = "sk-up-" + secrets.token_hex(8)
    llama = LlamaServer(tmp_path / "llama", api_key=upstream_key)
    try:
        srv = ServeProcess(["--model", llama.url, "--upstream-model", MODEL_ALIAS,
                            "--upstream-key-env", "QPROBE_TEST_UPSTREAM_KEY",
                            "--embedder", str(assets["folder"]), "--probe",
                            f"good={assets['good_dir']}", "--max-tokens", "6", "--k", "3", "--threads", "1"],
                           tmp_path / "serve-up.log", env={"QPROBE_TEST_UPSTREAM_KEY":
                                                           upstream_key})
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                              timeout=120)
            assert [m.id for m in c.models.list().data] == [MODEL_ALIAS, f"{MODEL_ALIAS}:good"]
            r = c.completions.create(model=f"{MODEL_ALIAS}:good", prompt="The sky is", seed=3,
                                     extra_body={"beta": 0})
            res = r.model_extra["qprobe"]["results"][0]
            assert len(res["scores"]) == 3 and res["chosen"] == int(np.argmax(res["scores"]))
            # the scores are the probe on the tiny model's features of the upstream's text
            emb = assets["model"].embedder()
            r = c.completions.create(model=f"{MODEL_ALIAS}:good", prompt="The sky is", seed=3,
                                     n=3, extra_body={"beta": 0})
            res = r.model_extra["qprobe"]["results"][0]
            texts = {j: ch.text for j, ch in zip(res["returned"], r.choices)}
            feats = emb.embed(["The sky is"] * 3, [texts[j] for j in range(3)])
            np.testing.assert_allclose(assets["good"].score(feats), res["scores"], atol=1e-3)
            assert upstream_key not in srv.log()
        finally:
            srv.stop()
    finally:
        llama.stop()
