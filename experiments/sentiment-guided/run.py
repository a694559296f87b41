"""Sentiment steering: base sampling, best-of-k with a Q-probe, and RAD / ARM guidance.

    python experiments/sentiment-guided/run.py experiments/sentiment-guided/config.yaml [--smoke] [--out DIR]

Stages (each output is kept; a rerun resumes after the last finished one):
1. collect train rollouts on neutral-train prompts (SmolLM2, no chat template, 20 tokens);
2. train the reward heads of the YAML (`qprobe.policy.head_train.train_head`) and a sequence-level
   Q-probe (`qprobe train`) on them;
3. generate on held-out neutral-test prompts: base sampling, base top-k sampling, best-of-k with
   the probe (argmax of Q among k, k from one pool of samples split into disjoint groups), and
   guided decoding for each head and beta (RAD heads on fewer prompts);
4. score: VADER compound (positive > 0.05), perplexity under a fixed scoring model, distinct-1/2/3;
   the share of positive continuations per prompt, averaged, with a 95% bootstrap CI over prompts;
5. report: report/results.md, results.json and frontier.png (positive rate vs perplexity).

Compute is reported as model tokens per kept token: 1 for base sampling, k for best-of-k, and
1 + reward-trunk token-forwards per token for guidance (0 extra for ARM on the model's own
feature state, ~1 for ARM on another block, top_k for RAD; a trunk stops at the head's block, so
this over-counts it), next to the measured tokens/s (noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from qprobe.fileio import atomic_write_json, atomic_write_text


def deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--smoke", action="store_true", help="the YAML's smoke sizes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=None, help="data folder (default: the usual search)")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.smoke:
        cfg = deep_update(cfg, cfg.get("smoke", {}))
    out = Path(args.out or cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    import torch
    from qprobe.policy.head_config import HeadConfig

    from qprobe.backends import SamplingParams, load_model
    from qprobe.cli import main as cli
    from qprobe.collect import collect_task
    from qprobe.policy.guided import GuideConfig, GuidedSampler
    from qprobe.policy.head_train import train_head
    from qprobe.policy.heads import RewardHead
    from qprobe.probe import Probe
    from qprobe.tasks import get_task

    torch.manual_seed(int(cfg.get("seed", 0)))
    say = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    task = get_task("sentiment", data=args.data)
    lm = load_model(cfg["model"], chat=False)
    params = SamplingParams(max_new_tokens=int(cfg["max_new_tokens"]), seed=int(cfg.get("seed", 0)),
                            **cfg["sampling"])

    # 1. train rollouts
    tr = cfg["train"]
    train_dir = out / "rollouts" / "train"
    collect_task(lm, task, tr["split"], train_dir, k=int(tr["k"]), params=params,
                 limit=int(tr["prompts"]), progress=False, say=say)

    # 2. heads and the sequence-level probe
    bundle = (lm.model, lm.tok.tokenizer, lm.name)
    heads: dict[str, RewardHead] = {}
    for h in cfg["heads"]:
        d = out / "heads" / h["name"]
        if not (d / "config.json").is_file():
            hc = HeadConfig(kind=h["kind"], rank=int(h.get("rank", 64)), layer=h.get("layer"),
                            label_threshold=tr.get("label_threshold"),
                            distill_from=str(out / "heads" / h["distill_from"])
                            if h.get("distill_from") else None,
                            **cfg.get("head_training", {}))
            say(f"training head {h['name']}")
            train_head([str(train_dir)], hc, model_bundle=bundle, say=say).save(d)
        heads[h["name"]] = RewardHead.load(d)
    probe_dir = out / "probe"
    if not (probe_dir / "config.json").is_file():
        cli(["train", str(train_dir), "--objective", cfg["probe"]["objective"], "--out",
             str(probe_dir), "--quiet"])
    probe = Probe.load(probe_dir, lm.feature_spec)

    # 3. generations on held-out prompts
    te = cfg["test"]
    n = int(te["samples"])
    rows = task.prompts(te["split"], limit=int(te["prompts"]))
    gen_dir = out / "generations"
    gen_dir.mkdir(exist_ok=True)

    def save(label: str, prs: list[dict], texts: list[list[str]], ntok: list[list[int]],
             meta: dict) -> None:
        recs = [{"prompt_id": r["id"], "prompt": r["prompt"], "sample": j, "text": t, "tokens": c}
                for r, ts, cs in zip(prs, texts, ntok) for j, (t, c) in enumerate(zip(ts, cs))]
        write_jsonl(gen_dir / f"{label}.jsonl", recs)
        atomic_write_json(gen_dir / f"{label}.meta.json", meta)

    def done(label: str) -> bool:
        return (gen_dir / f"{label}.meta.json").is_file()

    prompts = [r["prompt"] for r in rows]
    m = cfg["methods"]
    if m.get("base") and not done("base"):
        t0 = time.perf_counter()
        s = lm.sample(prompts, n, params)
        sec = time.perf_counter() - t0
        tok = sum(len(x.token_ids) for g in s for x in g)
        save("base", rows, [[x.text for x in g] for g in s], [[len(x.token_ids) for x in g] for g in s],
             {"method": "base", "tokens_per_s": tok / sec, "model_tokens_per_token": 1.0})
    gcfg = m.get("guided", {})
    top_k = int(gcfg.get("top_k", 20))
    if m.get("base") and not done(f"base-top{top_k}"):
        p_k = SamplingParams(**{**params.to_dict(), "top_k": top_k})
        t0 = time.perf_counter()
        s = lm.sample(prompts, n, p_k)
        sec = time.perf_counter() - t0
        tok = sum(len(x.token_ids) for g in s for x in g)
        save(f"base-top{top_k}", rows, [[x.text for x in g] for g in s],
             [[len(x.token_ids) for x in g] for g in s],
             {"method": f"base top-{top_k}", "tokens_per_s": tok / sec,
              "model_tokens_per_token": 1.0})
    ks = sorted(int(k) for k in m.get("best_of_k", []))
    if ks and not all(done(f"bok-{k}") for k in ks):
        kmax = ks[-1]
        t0 = time.perf_counter()
        pool = lm.sample(prompts, n * kmax, params)  # [P][n * kmax]
        sec = time.perf_counter() - t0
        tok = sum(len(x.token_ids) for g in pool for x in g)
        for k in ks:
            texts, ntok = [], []
            for g in pool:
                q = probe.score(np.stack([x.feature for x in g[: n * k]]))  # [n k]
                pick = [j * k + int(np.argmax(q[j * k : (j + 1) * k])) for j in range(n)]
                texts.append([g[i].text for i in pick])
                ntok.append([len(g[i].token_ids) for i in pick])
            save(f"bok-{k}", rows, texts, ntok,
                 {"method": f"best-of-{k} (Q-probe)", "k": k, "tokens_per_s": tok / sec / k,
                  "model_tokens_per_token": float(k)})
    for name in gcfg.get("heads", []):
        head = heads[name]
        prs = rows[: int(te["rad_prompts"])] if head.kind == "rad" else rows
        for beta in gcfg.get("betas", []):
            label = f"{name}-b{beta:g}"
            if done(label):
                continue
            sampler = GuidedSampler(lm, head, GuideConfig(beta=float(beta), top_k=top_k))
            t0 = time.perf_counter()
            s = sampler.sample([r["prompt"] for r in prs], n, params)
            sec = time.perf_counter() - t0
            c = sampler.cost()
            say(f"{label}: {c['tokens'] / sec:.1f} tokens/s, {c['reward_calls_per_token']:.1f} "
                "reward calls/token")
            save(label, prs, [[x.text for x in g] for g in s],
                 [[len(x.token_ids) for x in g] for g in s],
                 {"method": f"{sampler.method} ({name})", "head": name, "beta": float(beta),
                  "top_k": top_k, "tokens_per_s": c["tokens"] / sec,
                  "reward_calls_per_token": c["reward_calls_per_token"],
                  "model_tokens_per_token": 1.0 + c["reward_calls_per_token"]})

    # 4. scores and 5. report
    score_all(out, gen_dir, task, cfg, say)
    return 0


def score_all(out: Path, gen_dir: Path, task, cfg: dict, say) -> None:
    from qprobe.backends.hf import load_hf
    from qprobe.evaluate import Estimate
    from qprobe.tasks.sentiment import POSITIVE
    from qprobe.textquality import distinct_n, perplexity

    scorer = None
    results = []
    for meta_path in sorted(gen_dir.glob("*.meta.json")):
        label = meta_path.name[: -len(".meta.json")]
        meta = json.loads(meta_path.read_text())
        scored = gen_dir / f"{label}.scores.json"
        recs = read_jsonl(gen_dir / f"{label}.jsonl")
        if scored.is_file():
            sc = json.loads(scored.read_text())
        else:
            if scorer is None:
                say(f"loading the scoring model {cfg['scoring_model']}")
                scorer = load_hf(cfg["scoring_model"])
            comp = [s.reward for s in task.score([r["prompt"] for r in recs],
                                                 [r["text"] for r in recs])]
            # perplexity on the first `ppl_samples` continuations of each prompt (all: null):
            # the scoring model's forward passes dominate the CPU time of this stage
            cap = cfg.get("ppl_samples")
            idx = [i for i, r in enumerate(recs) if cap is None or r["sample"] < int(cap)]
            ppl = perplexity(scorer, [recs[i]["prompt"] for i in idx],
                             [recs[i]["text"] for i in idx])
            per = [None] * len(recs)
            for i, x in zip(idx, ppl["per_sample"]):
                per[i] = None if np.isnan(x) else float(x)
            sc = {"compound": comp, "ppl": per, "ppl_model": ppl["model"], "ppl_scored": len(idx)}
            atomic_write_json(scored, sc)
        comp = np.asarray(sc["compound"])
        pos = (comp > POSITIVE).astype(float)
        ppl = np.asarray([np.nan if x is None else x for x in sc["ppl"]], dtype=float)
        by_prompt: dict[str, list[int]] = {}
        for i, r in enumerate(recs):
            by_prompt.setdefault(r["prompt_id"], []).append(i)
        groups = list(by_prompt.values())
        est = Estimate.of(np.array([pos[g].mean() for g in groups]), int(cfg["n_boot"]), 0)
        texts = [[recs[i]["text"] for i in g] for g in groups]
        results.append({
            "label": label, **meta, "prompts": len(groups), "samples": len(recs),
            "positive": est.mean, "positive_ci": [est.lo, est.hi],
            "compound": float(comp.mean()),
            "ppl_mean": float(np.nanmean(ppl)) if np.isfinite(ppl).any() else None,
            "ppl_median": float(np.nanmedian(ppl)) if np.isfinite(ppl).any() else None,
            "ppl_empty": int(np.isnan(ppl).sum()) - (len(recs) - sc.get("ppl_scored", len(recs))),
            "ppl_scored": sc.get("ppl_scored", len(recs)), "ppl_model": sc["ppl_model"],
            **{f"dist{k}": distinct_n(texts, k) for k in (1, 2, 3)},
            "mean_tokens": float(np.mean([r["tokens"] for r in recs])),
        })
    rep = out / "report"
    rep.mkdir(exist_ok=True)
    atomic_write_json(rep / "results.json", {"config": cfg, "results": results})
    lines = ["# Sentiment steering: best-of-k vs token-level guidance", "",
             f"Generator {cfg['model']} (no chat template), {cfg['max_new_tokens']} new tokens; "
             f"perplexity under {cfg['scoring_model']}"
             + (f" (first {cfg['ppl_samples']} continuations per prompt)"
                if cfg.get("ppl_samples") is not None else "")
             + "; positive = VADER compound > 0.05. "
             "Positive rate: per-prompt share, mean over prompts, 95% bootstrap CI.", "",
             "| method | prompts x samples | positive [95% CI] | compound | ppl (mean / median) "
             "| dist-1/2/3 | model tokens / token | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["model_tokens_per_token"], r["label"])):
        lines.append(
            f"| {r['label']} | {r['prompts']} x {r['samples'] // max(r['prompts'], 1)} | "
            f"{r['positive']:.3f} [{r['positive_ci'][0]:.3f}, {r['positive_ci'][1]:.3f}] | "
            f"{r['compound']:.3f} | {r['ppl_mean'] or float('nan'):.1f} / "
            f"{r['ppl_median'] or float('nan'):.1f}"
            + (f" ({r['ppl_empty']} empty)" if r["ppl_empty"] else "")
            + f" | {r['dist1']:.2f}/{r['dist2']:.2f}/{r['dist3']:.2f} | "
            f"{r['model_tokens_per_token']:.1f} | {r['tokens_per_s']:.1f} |")
    atomic_write_text(rep / "results.md", "\n".join(lines) + "\n")
    frontier(results, rep / "frontier.png")
    print("\n".join(lines))


def frontier(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series: dict[str, list[dict]] = {}
    for r in results:
        key = r.get("head") or ("best-of-k" if r["label"].startswith("bok") else r["label"])
        series.setdefault(key, []).append(r)
    for key, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.get("beta", r.get("k", 0)))
        x = [r["ppl_mean"] for r in rs]
        y = [r["positive"] for r in rs]
        err = [[r["positive"] - r["positive_ci"][0] for r in rs],
               [r["positive_ci"][1] - r["positive"] for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=key)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the continuation (scoring model, log scale)")
    ax.set_ylabel("positive continuations")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
