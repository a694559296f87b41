"""An ARM token-level head trained from the HH preference pairs, guided on held-out prompts (issue 26).

The chosen/rejected setting of an autoregressive reward model: a bilinear head on SmolLM2's own
state scores each next token; a sequence's score is the sum over its tokens, fitted to every
train pair by the Bradley-Terry loss (`qprobe train-head --pairs`). Guided decoding then samples
from softmax(logits + beta * token score) over the top-k, so no weight of the model changes.

Stages (each skipped when its output exists, so a rerun resumes):
1. OUT/head-arm-pairs: the head, from OUT/pairs-train-all (every train pair);
2. OUT/test-arm-bBETA: one guided answer per held-out prompt (the prompts, sampling settings and
   stop strings of OUT/test-base), a rollouts folder the judge scores like the others
   (`QPROBE_JUDGE=OUT/judge qprobe score OUT/test-arm-bBETA --task experiments/hh_judge.py:reward`);
3. OUT/eval-pairs-arm.json: pair accuracy on OUT/pairs-test (sum of token scores, chosen vs
   rejected), per pair, beside the base model's summed log-likelihood.
Seconds of each stage go to OUT/seconds.txt as `arm-...`.

    python experiments/hh_arm.py results/hh-preferences --betas 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write_text


class Guided:
    """A local model whose `sample` is guided by a head: what `collect_task` needs of a model
    (name, features, batch size from the wrapped model; the head and beta in the name)."""

    def __init__(self, lm: Any, sampler: Any, label: str) -> None:
        self._lm, self._sampler, self.name = lm, sampler, f"{lm.name}+{label}"

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._lm, attr)

    def sample(self, prompts: list[str], k: int, params: Any) -> Any:
        return self._sampler.sample(prompts, k, params)


def log_seconds(out: Path, name: str, seconds: float) -> None:
    with open(out / "seconds.txt", "a") as f:
        f.write(f"{name} {round(seconds)}\n")


def pair_accuracy(out: Path, head_dir: Path, bundle: tuple) -> dict[str, Any]:
    """Per test pair: 1 if the head's summed token score ranks chosen above rejected."""
    from qprobe.backends.hf.tokenizer import PromptTokenizer
    from qprobe.policy.head_train import pair_indices, sequence_scores, token_states
    from qprobe.policy.heads import RewardHead
    from qprobe.rollouts import Rollouts

    hf, tokenizer, _ = bundle
    head = RewardHead.load(head_dir)
    r = Rollouts(out / "pairs-test")
    tok = PromptTokenizer(tokenizer, bool(r.meta.get("chat", False)))
    chosen, rejected = pair_indices([str(p) for p in r.column("prompt_id")], r.column("role"))
    rows = np.concatenate([chosen, rejected])
    prompts, ids = r.column("prompt"), r.column("token_ids")
    st = token_states(hf, head.feature_spec.layer, [tok.prompt_ids(prompts[i]) for i in rows],
                      [list(ids[i]) for i in rows])
    s = sequence_scores(st, head, hf.get_output_embeddings().weight.detach())  # [2P]
    n = len(chosen)
    ll = np.asarray(r.column("logprob_sum"), dtype=float)
    return {"rollouts": str(r.path), "head": str(head_dir), "n_pairs": int(n),
            "correct": (s[:n] > s[n:]).astype(int).tolist(),
            "ties": int((s[:n] == s[n:]).sum()),
            "base_logprob_sum_correct": (ll[chosen] > ll[rejected]).astype(int).tolist(),
            "prompt_ids": [str(r.column("prompt_id")[i]) for i in chosen]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the hh-preferences folder (experiments/hh-preferences.sh)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--top-k", type=int, default=20, help="next-token candidates scored per step")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--model", default="default", help="the model of OUT/test-base")
    a = ap.parse_args()
    out = a.out
    for need in ("pairs-train-all", "pairs-test", "test-base"):
        if not (out / need / "meta.json").is_file():
            raise SystemExit(f"hh_arm: {out / need} is missing (run experiments/hh-preferences.sh)")
    import torch

    from qprobe.backends import SamplingParams, load_model
    from qprobe.collect import collect_task
    from qprobe.head_config import HeadConfig
    from qprobe.policy.guided import GuideConfig, GuidedSampler
    from qprobe.policy.head_train import train_head
    from qprobe.policy.heads import RewardHead
    from qprobe.rollouts import Rollouts
    from qprobe.tasks import load_task

    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    base = Rollouts(out / "test-base")
    lm = load_model(a.model, chat=bool(base.meta.get("chat", False)))
    bundle = (lm.model, lm.tok.tokenizer, lm.name)
    head_dir = out / "head-arm-pairs"
    if not (head_dir / "config.json").is_file():
        t0 = time.perf_counter()
        cfg = HeadConfig(kind="arm", pairs=True, rank=a.rank, epochs=a.epochs, lr=a.lr)
        train_head([str(out / "pairs-train-all")], cfg, model_bundle=bundle, say=say).save(head_dir)
        log_seconds(out, "arm-train-head", time.perf_counter() - t0)
    task = load_task("hh-harmless", None)
    s = base.meta["sampling"]
    params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"],
                            max_new_tokens=s["max_new_tokens"], stop=list(s["stop"]),
                            seed=s["seed"])
    n_prompts = len(set(base.prompt_ids.tolist()))
    head = RewardHead.load(head_dir)
    for beta in a.betas:
        label = f"arm-b{beta:g}"
        d = out / f"test-{label}"
        if (d / "meta.json").is_file() and len(Rollouts(d)) >= n_prompts:
            continue
        torch.manual_seed(0)
        # unclamped: the head's token scores are log-odds shares (link identity), not rewards in
        # [0, 1]; the guide's default clamp to [0, 1] would drop every negative score
        sampler = GuidedSampler(lm, head, GuideConfig(beta=beta, top_k=a.top_k,
                                                      clamp_min=-math.inf, clamp_max=math.inf))
        t0 = time.perf_counter()
        collect_task(Guided(lm, sampler, f"arm-pairs(beta={beta:g},top_k={a.top_k},unclamped)"), task,
                     "test", d, k=1, params=params, limit=n_prompts,
                     batch_prompts=a.batch_prompts, progress=True, say=say)
        log_seconds(out, f"sample-{label}", time.perf_counter() - t0)
    task.close()
    ev = out / "eval-pairs-arm.json"
    if not ev.is_file():
        res = pair_accuracy(out, head_dir, bundle)
        atomic_write_text(ev, json.dumps(res) + "\n")
        say(f"pair accuracy {np.mean(res['correct']):.3f} on {res['n_pairs']} held-out pairs")


if __name__ == "__main__":
    try:
        main()
    except QProbeError as e:
        raise SystemExit(f"hh_arm: {e}") from None
