"""`qprobe adapt` (Q-Adapter and TRL's DPO on a LoRA), `adapt-eval` and `collect --adapter`
on a tiny model, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")

from qprobe.cli import main  # noqa: E402
from qprobe.rollouts import Rollouts  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402


def _pairs(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Q {i % 3}{'ab' * (i % 2)}:",
                                "chosen": f" yes {i % 4}!", "rejected": f" no {i % 5}?"}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("adapt")
    return save_tiny(base / "model"), _pairs(base / "train.jsonl", 4), _pairs(base / "test.jsonl", 3, 50)


def _adapt(model, task, out, *extra):
    return main(["adapt", "--model", str(model), "--task", str(task), "--split", "all",
                 "--out", str(out), "--batch-pairs", "4", "--lora-r", "4", "--no-chat",
                 "--max-answer-tokens", "16", *extra])


def test_dpo_with_trl_runs_one_step(setup, tmp_path, capsys):
    from safetensors.torch import load_file

    model, train, test = setup
    out = tmp_path / "dpo"
    assert _adapt(model, train, out, "--method", "dpo", "--lr", "1e-2") == 0
    info = json.loads((out / "adapter.json").read_text())
    assert info["method"] == "dpo" and info["steps"] == 1 and info["pairs"] == 4
    assert info["final"]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # B = 0 before the step
    w = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in w.items())  # it stepped
    capsys.readouterr()
    assert main(["adapt-eval", str(out), "--task", str(test), "--split", "all",
                 "--bootstrap", "50"]) == 0
    assert "3 pairs" in capsys.readouterr().out
    roll = tmp_path / "dpo-samples"
    assert main(["collect", "--adapter", str(out), "--task", str(test), "--no-pairs", "--k", "2",
                 "--max-new-tokens", "4", "--out", str(roll), "--no-progress"]) == 0
    r = Rollouts(roll)  # a merged DPO model's hidden states are not the base's: no features
    assert len(r) == 6 and r.feature_spec is None and "+dpo:" in r.meta["model"]


def test_qadapter_cli_trains_evaluates_and_samples(setup, tmp_path, capsys):
    model, train, test = setup
    out = tmp_path / "qa"
    assert _adapt(model, train, out, "--epochs", "2", "--save-every", "1") == 0
    info = json.loads((out / "adapter.json").read_text())
    assert info["method"] == "qadapter" and info["steps"] == 2
    assert info["params"] == {"a": 1.0, "a0": 0.01, "gamma": 1.0, "beta": 0.1}
    assert _adapt(model, train, out, "--epochs", "2", "--save-every", "1") == 0  # done: no-op
    assert _adapt(model, train, out, "--epochs", "3") == 2  # other settings: refused
    capsys.readouterr()
    js = tmp_path / "e.json"
    assert main(["adapt-eval", str(out), "--task", str(test), "--split", "all",
                 "--bootstrap", "50", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["accuracy"]["n_prompts"] == 3
    roll = tmp_path / "qa-samples"
    assert main(["collect", "--adapter", str(out), "--task", str(test), "--no-pairs", "--k", "2",
                 "--max-new-tokens", "4", "--layer", "1", "--out", str(roll),
                 "--no-progress"]) == 0
    base = tmp_path / "base-samples"
    assert main(["collect", "--model", str(model), "--no-chat", "--task", str(test), "--no-pairs",
                 "--k", "2", "--max-new-tokens", "4", "--layer", "1", "--out", str(base),
                 "--no-progress"]) == 0
    # the Q-Adapter samples carry the base model's features: the probes' spec
    assert Rollouts(roll).feature_spec == Rollouts(base).feature_spec
    assert "+qadapter:" in Rollouts(roll).meta["model"]


def test_perplexity_of_general_text_matches_unpadded_forwards(setup, tmp_path, capsys):
    """`adapt-eval --text`: each text's likelihood under the base and under the adapter's policy,
    batched with padding, equals a forward of that text alone through the formula."""
    from qprobe.adapters.forgetting import perplexity
    from qprobe.adapters.qadapter import QAdapterParams, policy_logits
    from qprobe.adapters.train import load_adapter

    model, train, _ = setup
    out = tmp_path / "qa"
    assert _adapt(model, train, out, "--lr", "5e-2") == 0
    texts = ["abc de", "hello world, a longer text here", "x y"]
    res = perplexity(out, texts, n_boot=20)
    peft_model, _, tok, info = load_adapter(out)
    p = QAdapterParams(**info["params"])
    base_lp = pol_lp = n = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            q = peft_model(input_ids=ids).logits[0, :-1].double()
            with peft_model.disable_adapter():
                b = torch.log_softmax(peft_model(input_ids=ids).logits[0, :-1].double(), -1)
            pol = torch.log_softmax(policy_logits(q, b, p), -1)
            nxt = ids[0, 1:, None]
            base_lp += float(b.gather(1, nxt).sum())
            pol_lp += float(pol.gather(1, nxt).sum())
            n += ids.shape[1] - 1
    assert res["n_tokens"] == n
    assert res["ppl_base"] == pytest.approx(math.exp(-base_lp / n), rel=1e-4)
    assert res["ppl_adapter"] == pytest.approx(math.exp(-pol_lp / n), rel=1e-4)
    assert res["ppl_adapter"] != pytest.approx(res["ppl_base"], rel=1e-6)  # the adapter moved
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"q": t, "a": "ok"}) + "\n" for t in texts))
    capsys.readouterr()
    js = tmp_path / "ppl.json"
    assert main(["adapt-eval", str(out), "--text", str(f), "--text-fields", "q,a",
                 "--bootstrap", "20", "--json", str(js)]) == 0
    assert "3 texts" in capsys.readouterr().out and json.loads(js.read_text())["n_texts"] == 3
    assert main(["adapt-eval", str(out), "--text", str(f), "--text-fields", "text"]) == 2
