"""The API run of experiments/gsm8k_pal_api.py on a tiny config against a real llama.cpp server
(SmolLM2's GGUF, a couple of prompts): completions from the server, features from two local
embedders on the same completions, the report, and a resume that asks the server nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qprobe.rollouts import Rollouts
from tiny_lm import save_tiny

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gsm8k_pal_api", ROOT / "experiments" / "gsm8k_pal_api.py")
api_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api_run)

TINY = ["--set", "sampling.k=2", "--set", "sampling.max_new_tokens=24",
        "--set", "probes.cv=2", "--set", "probes.objectives=[pg]", "--set", "probes.seeds=[0]",
        "--set", "probes.train={threads: 1, epochs: 5, min_steps: 20, batch_size: 16}",
        "--set", "probes.cv_grid.min_steps=[20]", "--set", "probes.cv_grid.lr=[1.0e-3]",
        "--set", "eval.ks=[1,2]", "--set", "eval.n_boot=50"]


@pytest.mark.parametrize("logprobs", [True, False])
def test_api_run_on_a_llama_cpp_server(tmp_path, logprobs):
    tiny = save_tiny(tmp_path / "tiny")
    out = tmp_path / "api"
    argv = ["--out", str(out), "--model", "default", "--embedders", f"default,{tiny}",
            "--train-limit", "2", "--test-limit", "1", "--threads", "2",
            "--local", str(tmp_path / "none"), *TINY] + (["--server-logprobs"] if logprobs else [])
    assert api_run.main(argv) == 0
    a, b = out / "api-smollm2" / "rollouts", out / f"api-{Path(tiny).name}" / "rollouts"
    for name, rows in (("train", 4), ("gsm8k-pal-test", 2), ("greedy-gsm8k-pal-test", 1)):
        ra, rb = Rollouts(a / name), Rollouts(b / name)
        assert len(ra) == len(rb) == rows
        assert ra.column("completion") == rb.column("completion")  # the same texts, replayed
        assert ra.meta["model"] == "default"  # the server's model id
        assert ra.features.shape[1] == 576 and rb.features.shape[1] == 64  # SmolLM2, tiny
        if not name.startswith("greedy"):  # the votes' answers (a greedy folder has one sample)
            assert None not in ra.column("exec_sig") and None not in rb.column("exec_sig")
        if name == "train" and logprobs:  # the server's token log-probs: rerank rows have them
            assert all(x is not None and x <= 0 for x in ra.column("logprob_sum"))
        elif name == "train":  # none asked: none stored
            assert ra.column("logprob_sum") == [None] * rows
    timing = json.loads((out / "timing.json").read_text())
    assert timing["server"]["samples"] == 4 + 2 + 1 and timing["server"]["tokens_per_s"] > 0
    assert {"embed-smollm2", f"embed-{Path(tiny).name}"} <= set(timing)
    report = (out / "report.md").read_text()
    assert "majority vote" in report and "| server |" in report
    res = json.loads((out / "api-smollm2" / "report" / "results.json").read_text())
    test = res["test"]["gsm8k-pal-test"]
    assert "majority_vote" in test["rules"]  # without log-likelihoods too (ties by sample order)
    assert ("rerank_mean_logprob" in test) == logprobs
    # a rerun finds everything stored: no new server samples
    assert api_run.main(argv) == 0
    assert json.loads((out / "timing.json").read_text())["server"] == timing["server"]
    assert np.isfinite(np.asarray(Rollouts(b / "train").features, dtype=np.float32)).all()
