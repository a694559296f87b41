"""How much does reward guidance slow decoding down? Side by side, in one run.

On the embedded SmolLM2-135M (no chat template) continuing sentiment prompts, every row
generating exactly `--new-tokens` tokens (EOS ignored, so all variants do the same work):

  unguided   top-k sampling (k = --top-k), no hook
  arm-own    ARM head on the model's own feature-layer state (no extra forward)
  arm-sep    ARM head on a separate reward trunk (here a second copy of the same model:
             one trunk token-forward per decoded token, up to the head's block)
  rad-own    RAD head on the model itself: the top-k candidates run through the model's blocks
             up to the head's block, k trunk token-forwards per decoded token

Heads have random weights (the cost does not depend on them) and beta = 1. The variants run
alternately, `--repeats` times each; the table gives the median tokens/s of each and its ratio
to unguided measured in the same round (the median of the per-round ratios), and the
reward-model token-forwards per decoded token.

    python bench/guided_speed.py                   # 16 prompts x 4 samples, 20 tokens, 3 rounds
    python bench/guided_speed.py --variants unguided,arm-own --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment-prompts"
VARIANTS = ("unguided", "arm-own", "arm-sep", "rad-own")


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (PROMPTS / "neutral_prompts.jsonl").read_text().splitlines()]
    return [r["prompt"]["text"] for r in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64, help="ARM rank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default="default")
    args = ap.parse_args()

    import torch

    from qprobe.backends import SamplingParams, load_model
    from qprobe.backends.hf import load_hf
    from qprobe.policy.guided import GuideConfig, GuidedSampler
    from qprobe.policy.heads import RewardHead, tokenizer_identity

    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    lm = load_model(args.model, chat=False, features=False)
    lm.eos_ids = set()  # every row runs to new_tokens
    spec = lm._spec
    tok = lm.tok.tokenizer
    dim = spec.dim

    def head(kind: str, spec_) -> RewardHead:
        torch.manual_seed(0)
        h = RewardHead(kind, dim, rank=min(args.rank, dim), feature_spec=spec_,
                       tokenizer=tokenizer_identity(tok))
        with torch.no_grad():
            for p in h.parameters():
                p.normal_(std=0.02)
        return h.eval()

    cfg = GuideConfig(beta=1.0, top_k=args.top_k)
    samplers: dict[str, object] = {}
    if "arm-own" in variants:
        samplers["arm-own"] = GuidedSampler(lm, head("arm", spec), cfg)
    if "rad-own" in variants:
        samplers["rad-own"] = GuidedSampler(lm, head("rad", spec), cfg)
    if "arm-sep" in variants:
        hf, rtok, ident = load_hf(args.model)
        from qprobe.features import FeatureSpec

        rspec = FeatureSpec(model=ident, layer=spec.layer, dim=dim, dtype="float32")
        samplers["arm-sep"] = GuidedSampler(lm, head("arm", rspec), cfg, (hf, rtok, ident))
    ps = prompts(args.prompts)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)
    unguided = SamplingParams(temperature=1.0, top_p=1.0, top_k=args.top_k,
                              max_new_tokens=args.new_tokens, seed=0)
    n_tok = args.prompts * args.k * args.new_tokens

    def run(v: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        if v == "unguided":
            lm.sample(ps, args.k, unguided)
            calls = 0.0
        else:
            s = samplers[v]
            before = (s.calls, s.tokens)
            s.sample(ps, args.k, params)
            calls = (s.calls - before[0]) / max(s.tokens - before[1], 1)
        return n_tok / (time.perf_counter() - t0), calls

    run("unguided")  # warm up (first-call allocations, thread pools)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    calls: dict[str, float] = {}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        got = {}
        for v in order:
            got[v], calls[v] = run(v)
            rates[v].append(got[v])
        if "unguided" in got:
            for v in variants:
                ratios[v].append(got[v] / got["unguided"])
    print(f"model {lm.name}, {args.prompts} prompts x {args.k} samples, {args.new_tokens} tokens, "
          f"top-k {args.top_k}, ARM rank {min(args.rank, dim)}, block {spec.layer}, "
          f"{args.threads} threads, {args.repeats} rounds")
    print(f"{'variant':10s} {'tokens/s':>9s} {'x unguided':>11s} {'reward calls/token':>19s}")
    for v in variants:
        ratio = f"{statistics.median(ratios[v]):.3f}" if ratios[v] else "-"
        print(f"{v:10s} {statistics.median(rates[v]):9.1f} {ratio:>11s} {calls[v]:19.1f}")


if __name__ == "__main__":
    main()
