"""The zero-parameter execution baselines of issue 24 on stored rollouts: each rule's reward at
k = all candidates with a 95% bootstrap CI, its paired difference with greedy and with the
shown-test filter, and each signal's within-prompt ranking AUC; plus the cost of each signal
(signals.json). Reads columns that `qprobe signals` filled; fits nothing.

    PYTHONPATH=src python bench/verifier_baselines.py \
        --set mbpp-test=results/mbpp-qwen-coder/rollouts/mbpp-test:results/mbpp-qwen-coder/rollouts/greedy-mbpp-test \
        --set humaneval=results/mbpp-qwen-coder/rollouts/humaneval:results/mbpp-qwen-coder/rollouts/greedy-humaneval \
        --out results/mbpp-qwen-coder-verifier
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from qprobe.rollouts import Rollouts
from qprobe.verifier.agreement import EXEC_COLUMNS, exec_extras
from qprobe.verifier.baselines import RULES, rule_scores, visible_ordinal
from qprobe.verifier.signals import COST_FILE

MBPP_TEST_FIRST_200 = {str(i) for i in range(11, 211)}  # the rest of MBPP test is held out
SIGNALS = ["logprob_mean", "visible_pass", "visible_ordinal", "mbr_share", "mbr_gen_share",
           "gen_pass_frac", "codet_score", "visible_wrong", "visible_error", "visible_syntax"]


def columns_of(r: Rollouts, keep: np.ndarray) -> tuple:
    """(group [n], prompt ids, rewards [n], signal columns [n] each) of the rows `keep` [N]."""
    ids = r.prompt_ids[keep].tolist()
    index: dict[str, int] = {}
    group = np.array([index.setdefault(p, len(index)) for p in ids], dtype=np.int64)
    rewards = r.rewards.astype(np.float64)[keep]
    cols = {k: v[keep] for k, v in (r.loglik() or {}).items()}
    if "visible_reward" in r.table.column_names:
        v = r.table.column("visible_reward").to_numpy(zero_copy_only=False).astype(np.float64)
        cols["visible_pass"] = np.where(np.isnan(v), 0.5, v)[keep]
    raw = {c: [x for x, k in zip(r.column(c), keep) if k] for c in EXEC_COLUMNS
           if c in r.table.column_names}
    cols.update(exec_extras(raw, group))
    if "visible_status" in raw and None not in raw["visible_status"]:
        cols["visible_ordinal"] = visible_ordinal(raw["visible_status"])
    return group, list(index), rewards, cols


def evaluate_set(test_dir: Path, greedy_dir: Path | None, n_boot: int, seed: int,
                 with_tests: bool = False) -> dict:
    r = Rollouts(test_dir)
    if r.meta.get("task") == "mbpp" and r.meta.get("split") == "test":
        extra = set(r.prompt_ids.tolist()) - MBPP_TEST_FIRST_200
        if extra:
            raise SystemExit(f"{test_dir}: holds MBPP test prompts past the first 200 (held out)")
    keep = np.ones(len(r), dtype=bool)
    if with_tests:  # only the prompts whose model-written tests have been run on every candidate
        gp = r.column("gen_passed") if "gen_passed" in r.table.column_names else [None] * len(r)
        ids = r.prompt_ids
        missing = {p for p, v in zip(ids.tolist(), gp) if v is None}
        keep = ~np.isin(ids, sorted(missing))
        if not keep.any():
            return {}
    group, prompts, rewards, cols = columns_of(r, keep)
    parts_r = split_groups(group, rewards)
    k = min(len(p[0]) for p in parts_r)
    out: dict = {"n_prompts": len(prompts), "k": k, "rules": {}, "auc": {}}
    out["pass@1"] = dataclasses.asdict(Estimate.of(np.array([p[0].mean() for p in parts_r]),
                                                   n_boot, seed))
    out[f"pass@{k}"] = dataclasses.asdict(Estimate.of(
        np.array([expected_max_at_k(p[0], k) for p in parts_r]), n_boot, seed))
    g_of = None
    if greedy_dir is not None:
        g = Rollouts(greedy_dir)
        g_of = dict(zip(g.prompt_ids.tolist(), g.rewards.astype(np.float64).tolist()))
        gv = np.array([g_of[p] for p in prompts])
        out["greedy"] = dataclasses.asdict(Estimate.of(gv, n_boot, seed))
    vals = {}
    for name, sc in rule_scores(cols).items():
        v = np.array([argmax_expected_reward(s, rr, k) for rr, s in split_groups(group, rewards, sc)])
        vals[name] = v  # [P] per-prompt reward of the chosen candidate, prompts in group order
        entry = {**dataclasses.asdict(Estimate.of(v, n_boot, seed)), "signals": list(RULES[name])}
        if g_of is not None:
            entry["vs_greedy"] = dataclasses.asdict(Estimate.of(v - gv, n_boot, seed))
        out["rules"][name] = entry
    if "shown_test_filter" in vals:
        for name, v in vals.items():
            if name != "shown_test_filter":
                out["rules"][name]["vs_shown_test_filter"] = dataclasses.asdict(
                    Estimate.of(v - vals["shown_test_filter"], n_boot, seed))
    for s in SIGNALS:
        if s in cols:
            out["auc"][s] = ranking(group, rewards, cols[s])
    f = test_dir / COST_FILE
    out["cost"] = json.loads(f.read_text()) if f.is_file() else {}
    return out


def _fmt(e: dict | None) -> str:
    return "-" if not e else f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _signed(e: dict | None) -> str:
    return "-" if not e else f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"


def markdown(res: dict, command: str) -> str:
    lines = ["# Zero-parameter execution baselines (issue 24)", "",
             "Qwen2.5-Coder-0.5B-Instruct, the candidates of `results/mbpp-qwen-coder/rollouts` "
             "(MBPP test: the first 200 prompts only). Each rule picks one candidate per prompt "
             "among all k; mean reward [95% bootstrap CI over prompts]; differences are paired "
             "(same prompts resampled). Nothing is fitted. Signals: docs/verifier.md.", "",
             "Reproduce:", "", "    " + command, ""]
    for label, r in res.items():
        lines += [f"## {label} ({r['n_prompts']} prompts, k = {r['k']})", "",
                  "| rule | sorts by (then mean log-prob) | reward | vs greedy | vs shown-test filter |",
                  "|---|---|---|---|---|",
                  f"| pass@1 | | {_fmt(r['pass@1'])} | | |",
                  f"| greedy | | {_fmt(r.get('greedy'))} | | |"]
        for name, e in r["rules"].items():
            lines.append(f"| {name} | {', '.join(e['signals']) or '-'} | {_fmt(e)} | "
                         f"{_signed(e.get('vs_greedy'))} | {_signed(e.get('vs_shown_test_filter'))} |")
        top = r[f"pass@{r['k']}"]
        lines += [f"| pass@{r['k']} | | {_fmt(top)} | | |", "",
                  "Within-prompt ranking AUC of each signal (mean over the prompts whose candidates "
                  "differ in reward; ties count one half; an error indicator scores below 0.5 "
                  "when errors are worse):", "", "| signal | within-prompt AUC | prompts |",
                  "|---|---|---|"]
        for s, a in r["auc"].items():
            w = a["within_prompt"]
            lines.append(f"| {s} | {'-' if w is None else f'{w:.3f}'} | "
                         f"{a['prompts_with_differing_rewards']} |")
        if r["cost"]:
            lines += ["", "Cost (signals.json; seconds are wall time on the shared 2-core machine):",
                      "", "| stage | prompts | seconds / prompt | programs | model tokens / prompt |",
                      "|---|---|---|---|---|"]
            for st, c in r["cost"].items():
                lines.append(f"| {st} | {c.get('prompts', 0):.0f} | {c.get('seconds_per_prompt', '-')} "
                             f"| {c.get('programs', 0):.0f} | {c.get('tokens_per_prompt', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", required=True, metavar="LABEL=TEST[:GREEDY]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = {}
    for s in args.set:
        label, paths = s.split("=", 1)
        test, _, greedy = paths.partition(":")
        g = Path(greedy) if greedy else None
        res[label] = evaluate_set(Path(test), g, args.n_boot, args.seed)
        if "codet" not in res[label]["rules"]:  # tests written for part of the prompts so far
            sub = evaluate_set(Path(test), g, args.n_boot, args.seed, with_tests=True)
            if sub:
                res[f"{label}, the prompts with model-written tests so far"] = sub
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", res)
    cmd = "PYTHONPATH=src python bench/verifier_baselines.py " + " ".join(
        f"--set {s}" for s in args.set) + f" --out {args.out}"
    atomic_write_text(out / "report.md", markdown(res, cmd))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
