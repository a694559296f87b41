"""Zero-parameter Coder-Reviewer rows: rerank each prompt's k samples by a reviewer score.

    PYTHONPATH=src python bench/reviewer_rerank.py \
        --set "MBPP test (first 200)=results/mbpp-qwen-coder/rollouts/mbpp-test:results/mbpp-qwen-coder/rollouts/greedy-mbpp-test" \
        --set "HumanEval=results/mbpp-qwen-coder/rollouts/humaneval:results/mbpp-qwen-coder/rollouts/greedy-humaneval" \
        --out results/mbpp-qwen-coder-verifier/reviewer

For each folder (`qprobe embed` and `qprobe review` done on it): the reward of choosing the
argmax of each score among all k samples, with a 95% bootstrap CI over prompts, its paired
difference from greedy decoding and from reranking by mean token log-prob, and the score's
within-prompt ranking AUC (over prompts with both passing and failing samples). Writes OUT.md and
OUT.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from qprobe.evaluate import (
    Estimate,
    argmax_expected_reward,
    expected_max_at_k,
    ranking,
    split_groups,
)
from qprobe.fileio import atomic_write_json, atomic_write_text
from qprobe.rollouts import EMBED_DIR, REVIEW_META, Rollouts

SCORES = [  # (row label, column of Rollouts.extra_inputs or "reviewer_text_mean")
    ("rerank by mean token log-prob (coder, free)", "logprob_mean"),
    ("rerank by summed log-prob (coder)", "logprob_sum"),
    ("reviewer, mean over the instruction's tokens", "reviewer_mean"),
    ("reviewer, sum", "reviewer_sum"),
    ("reviewer on the description alone (no shown test / examples), mean", "reviewer_text_mean"),
    ("coder + reviewer, sums (Coder-Reviewer)", "coder_reviewer"),
    ("coder + reviewer, means", "coder_reviewer_mean"),
]


def score_columns(r: Rollouts) -> dict[str, np.ndarray]:
    cols = dict(r.extra_inputs())
    rv = r.reviewer()
    if rv is None:
        sys.exit(f"{r.path}: no reviewer scores (run `qprobe review` on it)")
    cols["reviewer_text_mean"] = rv["reviewer_text_sum"] / np.maximum(rv["reviewer_text_tokens"], 1)
    return cols


def evaluate_set(label: str, folder: Path, greedy_folder: Path | None, n_boot: int, seed: int) -> dict:
    r = Rollouts(folder)
    group, prompts = r.groups()
    rewards = r.rewards
    keep = ~np.isnan(rewards)
    cols = score_columns(r)
    per = split_groups(group[keep], rewards[keep], *[cols[c][keep] for _, c in SCORES])
    present = sorted(set(group[keep].tolist()))
    k = max(len(p[0]) for p in per)
    vals = {c: np.array([argmax_expected_reward(p[1 + i], p[0], min(k, len(p[0]))) for p in per])
            for i, (_, c) in enumerate(SCORES)}  # [P] reward of the argmax per prompt
    pass1 = np.array([p[0].mean() for p in per])
    passk = np.array([expected_max_at_k(p[0], min(k, len(p[0]))) for p in per])
    est = lambda v: dataclasses.asdict(Estimate.of(v, n_boot, seed))  # noqa: E731
    out = {"label": label, "folder": str(folder), "prompts": len(per), "k": k,
           "pass@1": est(pass1), f"pass@{k}": est(passk), "rows": {}}
    greedy = None
    if greedy_folder is not None:
        g = Rollouts(greedy_folder)
        g_of = dict(zip(g.prompt_ids.tolist(), g.rewards.tolist()))
        greedy = np.array([g_of.get(prompts[i], np.nan) for i in present])
        out["greedy"] = est(greedy[~np.isnan(greedy)])
    base = vals["logprob_mean"]
    for name, c in SCORES:
        v = vals[c]
        rk = ranking(group, rewards, cols[c])
        row = {"score": c, "reward": est(v), "gain_over_pass@1": est(v - pass1),
               "vs_rerank_mean_logprob": est(v - base), "within_prompt_auc": rk["within_prompt"],
               "auc_prompts": rk["prompts_with_differing_rewards"], "pooled_auc": rk["pooled_auc"],
               "headroom_share": float((v.mean() - pass1.mean()) / max(passk.mean() - pass1.mean(), 1e-9))}
        if greedy is not None:
            m = ~np.isnan(greedy)
            row["vs_greedy"] = est(v[m] - greedy[m])
        out["rows"][name] = row
    meta = folder / EMBED_DIR / REVIEW_META
    if meta.is_file():
        out["reviewer_cost"] = json.loads(meta.read_text()).get("totals")
    return out


def fmt(e: dict | None, signed: bool = False) -> str:
    if not e:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(e['mean'])} [{f.format(e['lo'])}, {f.format(e['hi'])}]"


def markdown(sets: list[dict], command: str, n_boot: int) -> str:
    k = max(s["k"] for s in sets)
    lines = [f"# Coder-Reviewer reranking (zero-parameter rows), k = {k}", "",
             f"Choosing, for each prompt, the sample with the highest score among its {k} samples. "
             f"Reward with a 95% bootstrap CI over prompts ({n_boot} resamples); paired differences on "
             "the same prompts; within-prompt AUC = mean over prompts with both passing and "
             "failing samples of P(score of a passing sample > score of a failing one). The "
             "reviewer prompt is in docs/verifier.md (\"Reviewer likelihood\").", "",
             "Reproduce:", "", "    " + command, ""]
    for s in sets:
        pk = "pass@" + str(s["k"])
        lines += [f"## {s['label']} ({s['prompts']} prompts)", "",
                  f"pass@1 {fmt(s['pass@1'])}; greedy {fmt(s.get('greedy'))}; {pk} {fmt(s[pk])}", "",
                  "| score | reward | vs greedy | vs rerank by mean log-prob | within-prompt AUC |",
                  "|---|---|---|---|---|"]
        for name, row in s["rows"].items():
            auc = "-" if row["within_prompt_auc"] is None else f"{row['within_prompt_auc']:.3f}"
            lines.append(f"| {name} (`{row['score']}`) | {fmt(row['reward'])} | "
                         f"{fmt(row.get('vs_greedy'), True)} | "
                         f"{fmt(row['vs_rerank_mean_logprob'], True)} | {auc} ({row['auc_prompts']} prompts) |")
        c = s.get("reviewer_cost")
        if c:
            lines += ["", f"Cost of the reviewer pass (`qprobe review`, embedded/reviewer.json): "
                      f"{c['rows']} candidates ({c.get('duplicate_share', 0):.1%} duplicates, "
                      f"scored once), {c['tokens']:,} model tokens = "
                      f"{c.get('model_tokens_per_candidate')} per candidate, {c['seconds']:.0f} s = "
                      f"{c.get('seconds_per_prompt')} s per prompt, {c.get('tokens_per_s')} tokens/s."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", required=True, metavar="LABEL=FOLDER[:GREEDY]")
    ap.add_argument("--out", required=True, help="path without suffix: writes OUT.md and OUT.json")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sets = []
    for spec in args.set:
        label, _, paths = spec.partition("=")
        folder, _, greedy = paths.partition(":")
        sets.append(evaluate_set(label, Path(folder), Path(greedy) if greedy else None,
                                 args.n_boot, args.seed))
    command = "PYTHONPATH=src python bench/reviewer_rerank.py " + " ".join(
        f'--set "{s}"' for s in args.set) + f" --out {args.out}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"command": command, "sets": sets})
    text = markdown(sets, command, args.n_boot)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
