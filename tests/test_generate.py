"""generate: the probe's choice among k samples of a tiny random model, library and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qprobe.backends import SamplingParams, load_model
from qprobe.cli import main
from qprobe.errors import FeatureSpecMismatch, QProbeError
from qprobe.features import FeatureSpec
from qprobe.policy import QProbePolicy, best_of_k
from qprobe.probe import Probe
from tiny_lm import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("tiny") / "model")
    model = load_model(str(folder), layer=1)
    probe = Probe(model.feature_spec.dim, beta=0.5, objective="q", feature_spec=model.feature_spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.net[-1].weight.copy_(torch.randn(probe.net[-1].weight.shape, generator=g))
    probe_dir = probe.save(tmp_path_factory.mktemp("probe") / "probe")
    return folder, model, probe, probe_dir


PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)


def test_best_of_k_argmax_picks_highest_score(tiny) -> None:
    _, model, probe, _ = tiny
    c = best_of_k(model, probe, "ab", k=6, beta=0.0, params=PARAMS)
    assert len(c.candidates) == 6 and len(c.scores) == 6
    assert c.chosen == int(np.argmax(c.scores)) and c.text == c.candidates[c.chosen]
    assert c.weights[c.chosen] == 1.0
    # scores are the probe on the model's own features of the same samples
    samples = model.sample(["ab"], 6, PARAMS)[0]
    assert [s.text for s in samples] == c.candidates
    expect = probe.score(np.stack([s.feature for s in samples]))
    np.testing.assert_allclose(c.scores, expect, rtol=1e-5, atol=1e-5)


def test_policy_softmax_choice_is_seeded_and_uses_embedder(tiny) -> None:
    _, model, probe, _ = tiny
    a = QProbePolicy(model, probe, k=5, beta=None, params=PARAMS, seed=1).generate(["x", "yz"])
    b = QProbePolicy(model, probe, k=5, beta=None, params=PARAMS, seed=1).generate(["x", "yz"])
    assert [c.chosen for c in a] == [c.chosen for c in b]
    assert abs(sum(a[0].weights) - 1) < 1e-9 and max(a[0].weights) < 1  # beta = probe's 0.5
    # features from a separate embedder (the API-model path) give the same scores
    emb = model.embedder()
    e = QProbePolicy(model, probe, k=5, params=PARAMS, embedder=emb, seed=1).generate(["x", "yz"])
    np.testing.assert_allclose(e[1].scores, a[1].scores, rtol=1e-3, atol=1e-3)


def test_policy_refuses_other_features(tiny) -> None:
    _, model, _, _ = tiny
    other = FeatureSpec(model="other", layer=0, position="last", dim=model.feature_spec.dim)
    with pytest.raises(FeatureSpecMismatch):
        QProbePolicy(model, Probe(other.dim, feature_spec=other), k=2)
    with pytest.raises(QProbeError):
        QProbePolicy(model, Probe(other.dim, feature_spec=other), k=0)


def test_cli_generate_all_json(tiny, capsys) -> None:
    folder, _, _, probe_dir = tiny
    args = [
        "generate",
        "--model",
        str(folder),
        "--probe",
        str(probe_dir),
        "--k",
        "4",
        "--beta",
        "0",
        "--max-new-tokens",
        "6",
        "--seed",
        "2",
        "hello",
    ]
    assert main(args + ["--all"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["candidates"]) == 4 and d["beta"] == 0.0
    scores = [c["score"] for c in d["candidates"]]
    assert d["chosen"] == int(np.argmax(scores))
    assert main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == d["text"]
    assert main(["generate", "--probe", str(folder), "hi"]) == 2  # a model folder is no probe
    assert main(args + ["--task", "no-such-task"]) == 2
    capsys.readouterr()
    assert main(args + ["--all", "--max-new-tokens", "40", "--task", "times-tables"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert all("\n" not in c["text"] for c in cands)  # the task's stop string "\n" applies


def test_policy_with_log_likelihood_inputs_and_greedy_candidate(tiny) -> None:
    _, model, _, _ = tiny
    # A probe on the mean token log-probability alone: argmax = the likeliest sample.
    probe = Probe(1, beta=0.1, objective="pg", extras=("logprob_mean",))
    with torch.no_grad():
        probe.net[-1].weight.fill_(1.0)
    c = best_of_k(model, probe, "ab", k=5, beta=0.0, params=PARAMS, include_greedy=True)
    greedy = model.sample(["ab"], 1, SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8,
                                                    seed=3))[0][0]
    rest = model.sample(["ab"], 4, PARAMS)[0]
    assert c.candidates == [greedy.text] + [s.text for s in rest]
    means = [s.logprob_sum / max(len(s.token_ids), 1) for s in [greedy, *rest]]
    np.testing.assert_allclose(c.scores, means, rtol=1e-5, atol=1e-5)
    assert c.chosen == int(np.argmax(means))
    with pytest.raises(QProbeError, match="k must be >= 2"):
        QProbePolicy(model, probe, k=1, include_greedy=True)


def test_policy_with_the_visible_test_input(tiny) -> None:
    _, model, _, _ = tiny
    # A probe on visible_pass alone: argmax = a candidate whose shown tests pass.
    probe = Probe(1, beta=0.1, objective="pg", extras=("visible_pass",))
    with torch.no_grad():
        probe.net[-1].weight.fill_(1.0)
    with pytest.raises(QProbeError, match="pass visible="):
        QProbePolicy(model, probe, k=4)
    seen = []

    def visible(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [1.0 if i == 2 else (None if i == 3 else 0.0) for i in range(len(completions))]

    c = best_of_k(model, probe, "ab", k=4, beta=0.0, params=PARAMS, visible=visible)
    assert seen == [(["ab"] * 4, c.candidates)]
    assert c.scores == pytest.approx([0.0, 0.0, 1.0, 0.5])  # None (no shown test): 0.5
    assert c.chosen == 2


def test_a_probe_cannot_forget(tiny) -> None:
    """Whatever its weights, a probe only chooses among the base model's own samples: every
    candidate is the base sample for the seed, and at k = 1 the answer is the base model's
    (greedy or sampled), so nothing the base model could do is lost."""
    _, model, probe, _ = tiny
    flipped = Probe(probe.feature_dim, beta=0.0, objective="q", feature_spec=probe.feature_spec)
    with torch.no_grad():
        flipped.net[-1].weight.copy_(-probe.net[-1].weight)
    base = [s.text for s in model.sample(["2 * 3 ="], 6, PARAMS)[0]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, seed=3)
    base_greedy = model.sample(["2 * 3 ="], 1, greedy)[0][0].text
    chosen = set()
    for p in (probe, flipped):
        c = best_of_k(model, p, "2 * 3 =", k=6, beta=0.0, params=PARAMS)
        assert c.candidates == base and c.text in base
        chosen.add(c.chosen)
        assert best_of_k(model, p, "2 * 3 =", k=1, params=greedy).text == base_greedy
        assert best_of_k(model, p, "2 * 3 =", k=1, params=PARAMS).text == base[0]
    assert len(chosen) == 2  # the two probes disagree, yet neither leaves the base's samples
