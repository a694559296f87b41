"""Every policy kind behind `qprobe serve --policy NAME=SPEC`, with the real `openai` client.

One `qprobe serve` subprocess on loopback serves the tiny random model with a policy of each kind
of the registry: best-of-k on a probe, logprob, sample, greedy, guided (an ARM head on the
model's own states), a Q-Adapter and a DPO adapter (one training step each). Each answer must be
the library's answer for that policy alone (same seed); a per-token policy's stream must add up
to its non-streamed answer, arriving in pieces; bad policy specs are JSON errors and the server
stays up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("peft")
pytest.importorskip("trl")

from qprobe.backends import SamplingParams, load_model  # noqa: E402
from qprobe.cli import main  # noqa: E402
from qprobe.policy import registry  # noqa: E402
from qprobe.policy.heads import RewardHead, tokenizer_identity  # noqa: E402
from qprobe.policy.loading import ModelContext  # noqa: E402
from qprobe.probe import Probe  # noqa: E402
from test_serve import ServeProcess  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

MAX_TOKENS = 8
KINDS = ["bok", "lp", "s", "g", "guided", "qa", "dpo"]


def _pairs(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Q {i}:", "chosen": f" yes {i}!",
                                "rejected": f" no {i}?"}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("policies")
    folder = save_tiny(root / "model")
    model = load_model(str(folder), layer=1)
    spec = model.feature_spec
    probe = Probe(spec.dim, beta=0.0, objective="q", feature_spec=spec)
    with torch.no_grad():
        probe.net[-1].weight.copy_(torch.randn(probe.net[-1].weight.shape,
                                               generator=torch.Generator().manual_seed(0)))
    probe.save(root / "probe")
    torch.manual_seed(0)
    head = RewardHead("arm", spec.dim, rank=4, feature_spec=spec,
                      tokenizer=tokenizer_identity(model.tok.tokenizer))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        head.std.fill_(3.0)
    head.save(root / "head")
    pairs = _pairs(root / "pairs.jsonl", 4)
    for method in ("qadapter", "dpo"):
        assert main(["adapt", "--model", str(folder), "--task", str(pairs), "--split", "all",
                     "--out", str(root / method), "--method", method, "--batch-pairs", "4",
                     "--lora-r", "4", "--no-chat", "--max-answer-tokens", "8",
                     "--lr", "1e-2"]) == 0
    specs = {
        "bok": f"best-of-k:probe={root / 'probe'},k=3,beta=0",
        "lp": "logprob:reduce=mean,k=3",
        "s": "sample",
        "g": "greedy",
        "guided": f"guided:head={root / 'head'},beta=3,top_k=5",
        "qa": f"qadapter:adapter={root / 'qadapter'}",
        "dpo": f"dpo:adapter={root / 'dpo'}",
    }
    return {"root": root, "folder": folder, "specs": specs}


@pytest.fixture(scope="module")
def server(assets):
    args = ["--model", str(assets["folder"]), "--name", "tiny", "--max-tokens", str(MAX_TOKENS),
            "--threads", "1", "--batch-wait-ms", "5"]
    for name, spec in assets["specs"].items():
        args += ["--policy", f"{name}={spec}"]
    srv = ServeProcess(args, assets["root"] / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def library(assets):
    """The same policies built in this process, each over its own model."""
    return {name: registry.build(spec, ModelContext(str(assets["folder"])))
            for name, spec in assets["specs"].items()}


def _lib(policy, prompt: str, seed: int, n: int = 1, **opts):
    if opts:
        import dataclasses

        policy = policy.with_config(dataclasses.replace(policy.cfg, **opts))
    params = SamplingParams(max_new_tokens=MAX_TOKENS, seed=seed)
    return policy.generate([prompt], params, seed=seed, n=n)[0]


def test_every_kind_is_served_and_answers_as_the_library(client, library):
    assert [m.id for m in client.models.list().data] == ["tiny"] + [f"tiny:{k}" for k in KINDS]
    for name in KINDS:
        for seed in (1, 2):
            r = client.completions.create(model=f"tiny:{name}", prompt="ab x", seed=seed,
                                          max_tokens=MAX_TOKENS)
            lib = _lib(library[name], "ab x", seed)
            ext = r.model_extra["qprobe"]
            assert ext["kind"] == library[name].kind and ext["policy"] == name
            assert r.choices[0].text == lib.text, (name, seed)
            assert ext["results"][0]["chosen"] == lib.chosen
            assert r.usage.completion_tokens == sum(s.num_tokens for s in lib.samples)
    # the probe's scores and the log-likelihood scores are the library's
    r = client.completions.create(model="tiny:lp", prompt="cd", seed=3)
    lib = _lib(library["lp"], "cd", 3)
    np.testing.assert_allclose(r.model_extra["qprobe"]["results"][0]["scores"], lib.scores,
                               rtol=1e-5)
    assert lib.chosen == int(np.argmax(lib.scores))
    r = client.completions.create(model="tiny", prompt="cd", seed=3)  # the first policy
    assert r.model_extra["qprobe"]["kind"] == "best-of-k"


@pytest.mark.parametrize("name", ["guided", "qa", "dpo", "s"])
def test_a_per_token_policy_streams_its_answer_as_decoded(client, library, name):
    """The streamed pieces add up to the non-streamed answer for the same seed, arrive as
    several chunks (a best-of-k answer comes in one), and the usage is the same."""
    for seed in (4, 5):
        full = client.completions.create(model=f"tiny:{name}", prompt="ef w", seed=seed, n=2)
        chunks = list(client.completions.create(
            model=f"tiny:{name}", prompt="ef w", seed=seed, n=2, stream=True,
            stream_options={"include_usage": True}))
        for i in range(2):
            pieces = [c.choices[0].text for c in chunks
                      if c.choices and c.choices[0].index == i and c.choices[0].text]
            assert "".join(pieces) == full.choices[i].text
            assert "".join(pieces) == _lib(library[name], "ef w", seed, n=2).samples[i].text
            if len(full.choices[i].text) >= 3:
                assert len(pieces) >= 2, (name, pieces)
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        assert chunks[-1].model_extra["qprobe"]["results"] == full.model_extra["qprobe"]["results"]
    msgs = [{"role": "user", "content": "gh"}]
    full = client.chat.completions.create(model=f"tiny:{name}", messages=msgs, seed=6)
    chunks = list(client.chat.completions.create(model=f"tiny:{name}", messages=msgs, seed=6,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_best_of_k_streams_in_one_piece(client):
    chunks = list(client.completions.create(model="tiny:bok", prompt="ef w", seed=4,
                                            stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) <= 1


def test_request_options_and_bad_specs(server, client, library):
    # a request may set a policy's request options: the answer is the library's with them
    r = client.completions.create(model="tiny:guided", prompt="ab", seed=7,
                                  extra_body={"policy": "beta=0,top_k=3"})
    assert r.choices[0].text == _lib(library["guided"], "ab", 7, beta=0.0, top_k=3).text
    r = client.completions.create(model="tiny:guided", prompt="ab", seed=7,
                                  extra_body={"policy": "guided:inverse=true"})
    assert r.choices[0].text == _lib(library["guided"], "ab", 7, inverse=True).text
    r = client.completions.create(model="tiny:lp", prompt="ab", seed=7,
                                  extra_body={"policy": "reduce=sum", "k": 4})
    lib = _lib(library["lp"], "ab", 7, reduce="sum", k=4)
    assert r.choices[0].text == lib.text and len(r.model_extra["qprobe"]["results"][0]["scores"]) == 4
    bad = [("tiny:guided", {"policy": "top_k=0"}, "top_k"),
           ("tiny:guided", {"policy": "nope=1"}, "unknown option"),
           ("tiny:guided", {"policy": "head=/etc"}, "set by the server"),
           ("tiny:guided", {"policy": "best-of-k:k=2"}, "not 'best-of-k'"),
           ("tiny:guided", {"policy": "beta=abc"}, "not a valid float"),
           ("tiny:guided", {"policy": "guided:beta"}, "not key=value"),
           ("tiny:guided", {"policy": "beta"}, "serves a .guided. policy, not .beta."),
           ("tiny:guided", {"policy": 3}, "must be a string"),
           ("tiny:guided", {"k": 4}, "does not apply"),
           ("tiny:qa", {"policy": "adapter=x"}, "set by the server"),
           ("tiny:s", {"beta": 1}, "does not apply")]
    for model, body, msg in bad:
        with pytest.raises(openai.BadRequestError, match=msg) as e:
            client.completions.create(model=model, prompt="ab", extra_body=body)
        assert e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"] in ("policy", "k", "beta")
    assert client.completions.create(model="tiny:guided", prompt="alive").choices[0].text is not None
    assert server.proc.poll() is None


def test_bad_policy_specs_on_the_command_line(assets, capsys):
    for spec, msg in [("x=nope", "unknown kind 'nope'"), ("x=guided:beta=1", "give head="),
                      ("x=best-of-k:probe=/no/such", "no/such"), ("x=logprob:k=0", "k must be"),
                      ("x=sample:k=2", "unknown option 'k'")]:
        assert main(["serve", "--model", str(assets["folder"]), "--policy", spec,
                     "--port", "0"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", "--model", str(assets["folder"]), "--policy", "nope", "ab"]) == 2
    assert "unknown kind" in capsys.readouterr().err


def test_generate_with_a_policy_spec(assets, capsys):
    args = ["generate", "--model", str(assets["folder"]), "--max-new-tokens", "6", "--seed", "2",
            "--all", "ab"]
    assert main(args + ["--policy", "logprob:reduce=sum,k=4"]) == 0
    d = json.loads(capsys.readouterr().out)
    scores = [c["score"] for c in d["candidates"]]
    assert d["kind"] == "logprob" and len(scores) == 4 and d["chosen"] == int(np.argmax(scores))
    assert main(args + ["--policy", f"qadapter:adapter={assets['root'] / 'qadapter'}",
                        "--k", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "qadapter" and len(d["candidates"]) == 2
