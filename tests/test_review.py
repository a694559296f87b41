"""`qprobe review`: the reviewer log-likelihood log p(instruction | program), checked against a
plain forward of a tiny model on the whole reviewer prompt, its resumption, the echo answer of an
OpenAI-compatible server, and the extras a probe reads."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qprobe.cli import main
from qprobe.errors import QProbeError
from qprobe.review import (
    COMMENT,
    HFReviewer,
    HumanEvalReview,
    Instruction,
    MBPPReview,
    ReviewConfig,
    echo_scores,
    review_rollouts,
)
from qprobe.rollouts import EMBED_DIR, REVIEW_FILE, REVIEW_META, Rollouts, RolloutWriter
from tiny_lm import save_tiny

TEXTS = ["Write a function to add two numbers.", "Return the longest word.",
         "Count the vowels of s.", "Find the min of a list."]
NAMES = ["add", "longest", "vowels", "mn"]
COMPLETIONS = [  # per prompt: 4 candidates of different lengths, with duplicates
    ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n",
     "def add(a, b):\n    return a + b\n", "def add(x,y): return x+y\n"],
    ["def longest(w):\n    return max(w.split(), key=len)\n", "", "def longest(w): return w\n",
     "def longest(w):\n    return max(w.split(), key=len)\n"],
    ["def vowels(s):\n    return sum(c in 'aeiou' for c in s)\n", "def vowels(s): return 0\n",
     "def vowels(s): return 0\n", "def vowels(s): return 0\n"],
    ["def mn(xs): return min(xs)\n", "def mn(xs): return max(xs)\n", "def mn(xs):\n    xs.sort()\n"
     "    return xs[0]\n", "def mn(xs): return sorted(xs)[0]\n"],
]


def _prompt(i: int) -> str:
    return f'"""\n{TEXTS[i]}\nassert {NAMES[i]}(1) == 2\n"""\n'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return save_tiny(tmp_path_factory.mktemp("review") / "model")


@pytest.fixture()
def folder(tmp_path, tiny) -> Path:
    """An MBPP-format rollouts folder without features: two shards of two prompts x 4."""
    out = tmp_path / "roll"
    w = RolloutWriter(out, meta={"task": "mbpp", "model": str(tiny), "k": 4, "chat": False})
    for shard in ((0, 1), (2, 3)):
        rows = [{"prompt_id": str(i), "sample_idx": j, "prompt": _prompt(i), "completion": c,
                 "reward": float(j % 2)} for i in shard for j, c in enumerate(COMPLETIONS[i])]
        w.append(rows)
    return out


def _bundle(tiny: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(tiny)


def _reference(model, tok, context: str, instruction: str) -> tuple[float, int]:
    """log p(instruction | context) from one plain forward of the whole reviewer prompt."""
    c = tok(context)["input_ids"]
    ids = tok(context + instruction)["input_ids"]
    assert ids[: len(c)] == c  # the tiny tokenizer is per character
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[p - 1, ids[p]]) for p in range(len(c), len(ids))), len(ids) - len(c)


def test_prompts_put_the_program_first_and_the_same_instruction_after_it():
    f = MBPPReview(_prompt(0))
    assert f.instruction == Instruction(f'"""\n{TEXTS[0]}\n', 'assert add(1) == 2\n"""')
    assert f.context("def add(a, b): pass\n\n") == "def add(a, b): pass\n\n" + COMMENT
    assert f.context("") == COMMENT
    prompt = ('from typing import List\n\n\ndef helper(x):\n    """ not this one """\n    return x\n\n\n'
              'def f(xs: List[int]) -> int:\n    import math\n    """ Sum xs.\n    More words.\n'
              '    >>> f([1, 2])\n    3\n    """\n')
    h = HumanEvalReview(prompt)
    assert h.instruction == Instruction('    """ Sum xs.\n    More words.\n', '    >>> f([1, 2])\n    3\n    """')
    ctx = h.context("    return sum(xs)\n")
    assert ctx.endswith("    return sum(xs)\n\n" + COMMENT + "def f(xs: List[int]) -> int:\n    import math\n")
    assert ctx.startswith("from typing import List\n\n\ndef helper(x):\n    \"\"\" not this one") and "Sum xs" not in ctx
    with pytest.raises(QProbeError, match="no docstring"):
        HumanEvalReview("def f(x):\n    return x\n")
    with pytest.raises(QProbeError, match="docstring"):
        MBPPReview("def f(x):\n")


def test_reviewer_equals_a_plain_forward_with_batches_and_duplicates(folder, tiny):
    model, tok = _bundle(tiny)
    rv = HFReviewer(model, tok, "tiny")
    s = review_rollouts(ReviewConfig(rollouts=str(folder), progress=False), reviewer=rv,
                        say=lambda *_: None)
    assert s["new_shards"] == 2 and s["rows"] == 16
    t = pq.read_table(folder / EMBED_DIR / REVIEW_FILE.format("00000")).to_pylist() + \
        pq.read_table(folder / EMBED_DIR / REVIEW_FILE.format("00001")).to_pylist()
    meta = json.loads((folder / EMBED_DIR / REVIEW_META).read_text())
    # 16 rows, 4 duplicates (prompt 0: 1, prompt 1: 1, prompt 2: 2): 12 distinct programs run
    assert meta["totals"]["rows"] == 16 and meta["totals"]["unique_rows"] == 12
    assert meta["totals"]["tokens"] == sum(r["context_tokens"] + r["reviewer_tokens"] for r in
                                           {(r["prompt_id"], r["context_tokens"], r["reviewer_sum"]): r
                                            for r in t}.values())
    for r in t:
        i, j = int(r["prompt_id"]), r["sample_idx"]
        f = MBPPReview(_prompt(i))
        ctx = f.context(COMPLETIONS[i][j])
        lp, n = _reference(model, tok, ctx, f.instruction.text + f.instruction.rest)
        np.testing.assert_allclose(r["reviewer_sum"], lp, rtol=1e-5, atol=1e-4)
        lp_text, n_text = _reference(model, tok, ctx, f.instruction.text)
        np.testing.assert_allclose(r["reviewer_text_sum"], lp_text, rtol=1e-5, atol=1e-4)
        assert (r["reviewer_tokens"], r["reviewer_text_tokens"]) == (n, n_text)
        assert r["context_tokens"] == len(tok(ctx)["input_ids"]) and r["joint_match"]
    # duplicates get their program's score; distinct programs differ
    by = {(int(r["prompt_id"]), r["sample_idx"]): r["reviewer_sum"] for r in t}
    assert by[(0, 0)] == by[(0, 2)] and by[(2, 1)] == by[(2, 2)] == by[(2, 3)]
    assert by[(0, 0)] != by[(0, 1)]


def test_humaneval_reviewer_equals_a_plain_forward(tmp_path, tiny):
    prompt = ("import math\n\n\ndef helper(x):\n    return x\n\n\ndef area(r):\n    \"\"\" Area of a "
              "circle of radius r.\n    >>> area(1)\n    3.14\n    \"\"\"\n")
    comps = ["    return math.pi * r * r\n", "    return 2 * r\n", "    return math.pi * r * r\n"]
    out = tmp_path / "he"
    RolloutWriter(out, meta={"task": "humaneval", "k": 3}).append(
        [{"prompt_id": "HumanEval/0", "sample_idx": j, "prompt": prompt, "completion": c, "reward": 0.0}
         for j, c in enumerate(comps)])
    model, tok = _bundle(tiny)
    review_rollouts(ReviewConfig(rollouts=str(out), progress=False),
                    reviewer=HFReviewer(model, tok, "tiny"), say=lambda *_: None)
    t = pq.read_table(out / EMBED_DIR / REVIEW_FILE.format("00000")).to_pylist()
    f = HumanEvalReview(prompt)
    assert f.instruction.rest.startswith("    >>> area(1)")
    for r, c in zip(t, comps):
        ctx = f.context(c)
        assert ctx.startswith("import math\n\n\ndef helper(x):") and ctx.endswith(COMMENT + "def area(r):\n")
        lp, n = _reference(model, tok, ctx, f.instruction.text + f.instruction.rest)
        np.testing.assert_allclose(r["reviewer_sum"], lp, rtol=1e-5, atol=1e-4)
        assert r["reviewer_tokens"] == n
    assert t[0]["reviewer_sum"] == t[2]["reviewer_sum"] != t[1]["reviewer_sum"]


def test_review_resumes_only_missing_shards_and_refuses_another_model(folder, tiny):
    assert main(["review", str(folder), "--model", str(tiny), "--no-progress", "--threads", "1"]) == 0
    done = folder / EMBED_DIR / REVIEW_FILE.format("00000")
    kept = folder / EMBED_DIR / REVIEW_FILE.format("00001")
    before, stamp = pq.read_table(done), kept.stat().st_mtime_ns
    done.unlink()
    model, tok = _bundle(tiny)
    s = review_rollouts(ReviewConfig(rollouts=str(folder), progress=False),
                        reviewer=HFReviewer(model, tok, str(tiny)), say=lambda *_: None)
    assert s["new_shards"] == 1 and s["rows"] == 8
    s = review_rollouts(ReviewConfig(rollouts=str(folder), progress=False),
                        reviewer=HFReviewer(model, tok, str(tiny)), say=lambda *_: None)
    assert s["new_shards"] == 0
    totals = json.loads((folder / EMBED_DIR / REVIEW_META).read_text())["totals"]
    assert totals["rows"] == 16 and totals["prompts"] == 4  # every shard's cost stays counted
    assert kept.stat().st_mtime_ns == stamp
    assert pq.read_table(done).equals(before)
    other = HFReviewer(model, tok, "another-model")
    with pytest.raises(QProbeError, match="another-model"):
        review_rollouts(ReviewConfig(rollouts=str(folder), progress=False), reviewer=other,
                        say=lambda *_: None)


def test_reviewer_extras_reach_a_probe(folder, tiny, tmp_path):
    from qprobe.probe import Probe

    assert main(["review", str(folder), "--model", str(tiny), "--no-progress"]) == 0
    r = Rollouts(folder)
    cols = r.extra_inputs()
    mean = cols["reviewer_mean"]
    rv = r.reviewer()
    np.testing.assert_allclose(mean, rv["reviewer_sum"] / rv["reviewer_tokens"])
    assert "coder_reviewer" not in cols  # no coder log-likelihood in this folder
    # plant rewards: the candidate whose reviewer_mean is above its prompt's median passes
    group, _ = r.groups()
    planted = np.array([float(mean[i] > np.median(mean[group == group[i]])) for i in range(len(r))])
    r.set_rewards(planted.tolist())
    out = tmp_path / "probe"
    assert main(["train", str(folder), "--out", str(out), "--feature-set", "none",
                 "--extras", "reviewer_mean", "--quiet", "--min-steps", "200"]) == 0
    p = Probe.load(out)
    assert p.extras == ("reviewer_mean",)
    q = p.score_rollouts(Rollouts(folder))
    assert np.corrcoef(q, mean)[0, 1] > 0.99  # one input: the probe ranks by it, upwards
    from qprobe.policy.best_of_k import QProbePolicy

    with pytest.raises(QProbeError, match="stored rollouts only"):  # fresh samples have no review
        QProbePolicy(None, p)  # type: ignore[arg-type]
    from qprobe.serve.models import load_served

    with pytest.raises(QProbeError, match="stored rollouts only"):  # refused before loading a model
        load_served("no-such-model", [], probe_args=[f"rv={out}"])


class _Echo(BaseHTTPRequestHandler):
    """A vLLM-shaped /v1/completions answer with echo: the tiny model's prompt log-probs."""

    model = tok = None
    asked: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).asked.append(body)
        if body.get("max_tokens") == 0 and getattr(type(self), "refuse_zero", False):
            return self._send(400, {"error": {"message": "max_tokens must be at least 1"}})
        ids = self.tok(body["prompt"])["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        toks = [self.tok.decode([t]) for t in ids]
        vals = [None] + [float(logp[p - 1, ids[p]]) for p in range(1, len(ids))]
        offs = list(np.cumsum([0] + [len(x) for x in toks[:-1]]).tolist())
        if body["max_tokens"]:  # one generated token after the prompt
            toks, vals, offs = toks + ["x"], vals + [-0.5], offs + [len(body["prompt"])]
        self._send(200, {"id": "c", "object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "text": body["prompt"], "finish_reason": "length",
                                      "logprobs": {"tokens": toks, "token_logprobs": vals,
                                                   "text_offset": offs, "top_logprobs": None}}]})

    def do_GET(self):  # noqa: N802
        self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def _send(self, status: int, obj: dict) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("refuse_zero", [False, True])
def test_server_reviewer_reads_echoed_prompt_logprobs(folder, tiny, tmp_path, refuse_zero):
    """Against a fake server of the documented OpenAI/vLLM echo shape (not a real vLLM)."""
    model, tok = _bundle(tiny)
    _Echo.model, _Echo.tok, _Echo.asked, _Echo.refuse_zero = model, tok, [], refuse_zero
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        local = tmp_path / "local"
        shutil.copytree(folder, local)
        review_rollouts(ReviewConfig(rollouts=str(local), progress=False),
                        reviewer=HFReviewer(model, tok, "tiny"), say=lambda *_: None)
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert main(["review", str(folder), "--model", url, "--no-progress", "--concurrency", "2"]) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(b["echo"] and b["logprobs"] == 1 for b in _Echo.asked)
    assert {b["max_tokens"] for b in _Echo.asked} == ({0, 1} if refuse_zero else {0})
    for sid in ("00000", "00001"):
        a = pq.read_table(folder / EMBED_DIR / REVIEW_FILE.format(sid))
        b = pq.read_table(local / EMBED_DIR / REVIEW_FILE.format(sid))
        for col in ("reviewer_sum", "reviewer_text_sum"):
            np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), atol=1e-6)
        for col in ("reviewer_tokens", "reviewer_text_tokens", "context_tokens"):
            assert a.column(col).to_pylist() == b.column(col).to_pylist()
    assert json.loads((folder / EMBED_DIR / REVIEW_META).read_text())["model"] == "tiny"


def test_echo_scores_rejects_answers_without_prompt_logprobs():
    with pytest.raises(QProbeError, match="echo"):
        echo_scores({"choices": [{"text": "x"}]}, 1, 2, 3, where="POST x")
    lp = {"tokens": ["ab", "\n", "cd", "e"], "token_logprobs": [None, -1.0, -2.0, -3.0]}
    # no text_offset: rebuilt from the token strings; context "ab\n", text "cd", rest "e"
    assert echo_scores({"choices": [{"logprobs": lp}]}, 3, 5, 6, where="x") == (-5.0, -2.0, 2, 1, 4)



def test_the_light_config_names_every_reviewer_format():
    from qprobe.review import REVIEW_FORMATS
    from qprobe.review_config import REVIEW_TASKS

    assert list(REVIEW_TASKS) == sorted(REVIEW_FORMATS)
