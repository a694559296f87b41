"""The report folder of an experiment: results.md, results.json and PNG plots.

The headline probe is the objective cross-validation on the train prompts ranks first (the best
CV score of its chosen setting); the other objectives are shown beside it, never picked on test.
Without CV no objective is the headline.

- reward_vs_k.png        reward of each objective's probe vs k (mean over seeds, band = min..max
                         over seeds), with pass@1, pass@k (skyline), greedy and few-shot (paper fig. 3)
- reward_vs_train_prompts.png  reward vs number of training prompts, mean and min..max band over
                         the random subsets (paper fig. 2)
- score_vs_reward.png    mean reward of test samples binned by probe score (deciles), one line per
                         seed (calibration: does a higher score mean a higher reward?)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.fileio import atomic_write, atomic_write_text

BASELINE_COLORS = {"pass@1": "0.4", "pass@k": "0.0", "greedy": "tab:brown", "few_shot": "tab:pink"}


def _public(obj: Any) -> Any:
    """Drop private keys (arrays kept for plotting) and make numpy values JSON-friendly."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_public(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _ci(e: dict[str, Any]) -> str:
    if not e or e.get("n_prompts", 0) == 0:
        return "-"
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _cv_note(cfg: dict[str, Any]) -> str:
    folds = cfg["probes"].get("cv")
    if not folds:
        return ""
    return (f"; each objective's inputs (feature set, log-likelihoods) and steps chosen by "
            f"{folds}-fold cross-validation over the train prompts (the paired table says which)")


def cv_score(cv: dict[str, Any]) -> dict[str, float]:
    """The cross-validation score (mean and standard error over folds) of the setting CV chose,
    from its table (`qprobe.train.cv.cross_validate`): what the headline ranks objectives by."""
    best = cv["rows"][cv["best"]]
    return {"mean": float(best["mean"]), "se": float(best["se"])}


def headline_objective(res: dict[str, Any]) -> dict[str, Any] | None:
    """The objective whose CV-chosen setting scored best on the train prompts, with every
    objective's CV score (mean and standard error over folds); None without CV scores.
    Ties go to the first objective of the config."""
    objs = res["config"]["probes"]["objectives"]
    first = next(iter(res["test"].values()), {}).get("probes", {})
    scores = {o: first[o]["cv_score"] for o in objs if first.get(o, {}).get("cv_score")}
    if not scores or len(scores) != len(objs):
        return None
    best = max(objs, key=lambda o: (scores[o]["mean"], -objs.index(o)))
    return {"objective": best, "by": "cross-validation score on the train prompts",
            "cv_scores": scores}


def _headline_note(res: dict[str, Any]) -> list[str]:
    h = res.get("headline")
    if not h:
        return ["No objective is chosen on train (no cross-validation): every probe row is shown, "
                "none is the headline.", ""]
    ranked = sorted(h["cv_scores"].items(), key=lambda kv: -kv[1]["mean"])
    return [f"Headline: probe `{h['objective']}`, the objective cross-validation on the train "
            "prompts ranks first (CV selection reward of each objective's chosen setting, mean "
            "+- standard error over folds: "
            + ", ".join(f"`{o}` {v['mean']:.4f} +- {v['se']:.4f}" for o, v in ranked)
            + "). The other probes are shown beside it; choosing among them by their test "
            "numbers would be choosing on test.", ""]


def results_markdown(res: dict[str, Any]) -> str:
    """The headline tables: every baseline and probe on every test set, with CIs."""
    cfg = res["config"]
    k, beta = max(cfg["eval"]["ks"]), cfg["eval"]["beta"]
    s = cfg["sampling"]
    fs = res["feature_spec"]
    lines = [
        f"# {res['name']}",
        "",
        f"Model `{fs['model']}`, features collected at layer {fs['layer']} ({fs['position']} "
        f"token, dim {fs['dim']}){_cv_note(cfg)}. Train: `{cfg['train']['task']}` / {cfg['train']['split']}, "
        f"{res['train']['n_prompts']} prompts x {s['k']} samples. Sampling: temperature "
        f"{s['temperature']}, top-p {s['top_p']}, max {s['max_new_tokens']} new tokens. Probes: "
        f"{', '.join(cfg['probes']['objectives'])} x seeds {cfg['probes']['seeds']}.",
        "",
        f"Rewards are means over test prompts with a 95% bootstrap CI over prompts. Probe rows: the "
        f"analytic expected reward of choosing among k = {k} samples with softmax(Q/beta), "
        f"beta = {beta} (or the beta cross-validation chose, as the row says), averaged over "
        f"random k-subsets and over the training seeds; "
        f"'gain' is probe minus pass@1 (paired bootstrap CI); 'headroom' = gain / (pass@{k} - pass@1).",
        "",
        *_headline_note(res),
    ]
    head = (res.get("headline") or {}).get("objective")
    for label, t in res["test"].items():
        lines += _test_table(label, t, k, beta, s["k"], head)
        lines += _ranking_table(t)
        for n in t.get("notes", []):
            lines.append(f"note: {n}  ")
    if "curve" in res:
        lines += _curve_table(res)
    tm = res.get("timings", {})
    if tm:
        lines += [
            "## Wall time of this invocation",
            "",
            ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in tm.items())
            + " (stages found on disk from an earlier run are not redone and take ~0 s)",
            "",
        ]
    lines += [
        "Plots: `reward_vs_k.png`, `reward_vs_train_prompts.png`, `score_vs_reward.png`; "
        "all numbers: `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _test_table(label: str, t: dict[str, Any], k: int, beta: float, n_samples: int,
                headline: str | None = None) -> list[str]:
    """One test set: pass@1, the baselines, each probe (the headline marked) and the pass@k
    skyline."""
    p1 = t["pass@1"]["mean"]
    pk = t["pass@k"][str(k)]["mean"]
    lines = [
        f"## {label} ({t['n_prompts']} prompts x {n_samples} samples)",
        "",
        "| method | reward [95% CI] | gain over pass@1 | headroom | seed spread |",
        "|---|---|---|---|---|",
        f"| base pass@1 | {_ci(t['pass@1'])} | | | |",
    ]
    if "greedy" in t:
        lines.append(f"| greedy | {_ci(t['greedy'])} | {t['greedy']['mean'] - p1:+.3f} | | |")
    if "few_shot" in t:
        lines.append(
            f"| {t['few_shot'].get('shots', '?')}-shot on successes (greedy) | "
            f"{_ci(t['few_shot'])} | {t['few_shot']['mean'] - p1:+.3f} | | |"
        )
    for name, what in (("rerank_mean_logprob", "mean"), ("rerank_sum_logprob", "sum")):
        if name in t:
            g = t[name]["gain"]
            lines.append(
                f"| rerank by {what} token log-prob (k={t[name]['k']}) | {_ci(t[name])} | "
                f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | "
                f"{_headroom(g['mean'], p1, pk)} | |")
    if "rerank_visible" in t:
        g = t["rerank_visible"]["gain"]
        lines.append(
            f"| filter by the prompt's shown tests, then mean log-prob (k={t['rerank_visible']['k']}) "
            f"| {_ci(t['rerank_visible'])} | {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | "
            f"{_headroom(g['mean'], p1, pk)} | |")
    for name, rule in t.get("rules", {}).items():
        g = rule["gain"]
        lines.append(
            f"| free rule `{name}` (k={rule['k']}) | {_ci(rule)} | "
            f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | {_headroom(g['mean'], p1, pk)} | |")
    for obj, pr in t["probes"].items():
        g = pr["gain_over_pass@1"]
        head = f"{g['mean'] / (pk - p1):.0%}" if pk > p1 else "-"  # no headroom: undefined
        sm = pr["seed_means"]
        lines.append(
            f"| probe `{obj}` (k={k}, beta={pr.get('beta', beta):g})"
            f"{', **headline** (best CV on train)' if obj == headline else ''} | {_ci(pr['mean_over_seeds'])} | "
            f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | {head} | "
            f"{min(sm):.3f}..{max(sm):.3f} ({len(sm)} seed{'s' if len(sm) > 1 else ''}) |"
        )
        if "weighted_vote" in pr:
            wv = pr["weighted_vote"]
            lines.append(
                f"| vote weighted by probe `{obj}` (k={wv['k']}) | {_ci(wv)} | "
                f"{wv['mean'] - p1:+.3f} | {_headroom(wv['mean'] - p1, p1, pk)} | |")
        for bk, wg in pr.get("with_greedy", {}).items():
            if bk.startswith("beta="):
                lines.append(
                    f"| probe `{obj}`, greedy + {wg_k(pr) - 1} samples ({bk}) | {_ci(wg)} | "
                    f"{wg['mean'] - p1:+.3f} | {_headroom(wg['mean'] - p1, p1, pk)} | |")
    for name, pol in t.get("policies", {}).items():
        g = pol["gain_over_pass@1"]
        lines.append(
            f"| policy `{name}` (`{pol['spec']}`, {pol['n_prompts']} prompts) | {_ci(pol)} | "
            f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | "
            f"{_headroom(g['mean'], p1, pk)} | |")
    lines.append(
        f"| pass@{k} (skyline) | {_ci(t['pass@k'][str(k)])} | {pk - p1:+.3f} | {'100%' if pk > p1 else '-'} | |"
    )
    lines.append("")
    lines += _paired_table(t)
    lines += _rules_table(t)
    return lines


def _rules_table(t: dict[str, Any]) -> list[str]:
    """Each probe against every zero-parameter rule over the free signals (paired, same
    prompts), and each rule's within-prompt ranking: what the learned policy must beat."""
    rules = t.get("rules", {})
    if not rules:
        return []
    sg = lambda e: "-" if not e else f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"  # noqa: E731
    names = list(rules)
    best = max(names, key=lambda n: rules[n]["mean"])
    lines = ["Against the free rules (zero parameters, `qprobe signals`; docs/verifier-execution.md): "
             "each probe's headline minus the rule's, same prompts, 95% paired bootstrap CI. "
             f"The best rule on this test set (chosen on test: the sceptic's side) is `{best}`.", "",
             "| probe | " + " | ".join(f"vs `{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    named = [(f"`{obj}`", pr) for obj, pr in t["probes"].items()]
    named += [(f"policy `{n}`", pol) for n, pol in t.get("policies", {}).items()]
    for obj, pr in named:
        p = pr.get("paired", {})
        lines.append(f"| {obj} | " + " | ".join(sg(p.get(f"vs_{n}")) for n in names) + " |")
    for obj, pr in t["probes"].items():
        if "weighted_vote" in pr:
            wv = pr["weighted_vote"]
            lines.append(f"| vote weighted by `{obj}` | " + " | ".join(
                sg(wv.get("vs_majority_vote")) if n == "majority_vote" else "-" for n in names) + " |")
    lines += ["", "| rule | within-prompt ranking | pooled AUC |", "|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for n in names:
        rk = rules[n].get("ranking") or {}
        lines.append(f"| `{n}` | {fmt(rk.get('within_prompt'))} | {fmt(rk.get('pooled_auc'))} |")
    lines.append("")
    return lines


def wg_k(pr: dict[str, Any]) -> int:
    return int(pr.get("with_greedy", {}).get("k", 0))


def _headroom(gain: float, p1: float, pk: float) -> str:
    return f"{gain / (pk - p1):.0%}" if pk > p1 else "-"


def _paired_table(t: dict[str, Any]) -> list[str]:
    """Each probe against greedy and against mean-logprob reranking on the same prompts, and
    what cross-validation chose for it."""
    rows = [(f"`{obj}`", pr) for obj, pr in t["probes"].items()
            if pr.get("paired") or pr.get("cv_chosen")]
    rows += [(f"policy `{name}`", {**pol, "cv_chosen": "-"})
             for name, pol in t.get("policies", {}).items() if pol.get("paired")]
    if not rows:
        return []
    vis = any("vs_rerank_visible" in pr.get("paired", {}) for _, pr in rows)
    lines = ["Paired comparisons (the probe's headline minus the other method, same prompts, "
             "95% paired bootstrap CI), and the setting cross-validation on train chose:", "",
             "| probe | vs greedy | vs rerank by mean log-prob | "
             + ("vs shown-tests filter | " if vis else "") + "chosen on train |",
             "|---|---|---|" + ("---|" if vis else "") + "---|"]
    sg = lambda e: "-" if not e else f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"  # noqa: E731
    for obj, pr in rows:
        p = pr.get("paired", {})
        lines.append(f"| {obj} | {sg(p.get('vs_greedy'))} | {sg(p.get('vs_rerank_mean_logprob'))} | "
                     + (f"{sg(p.get('vs_rerank_visible'))} | " if vis else "")
                     + f"{pr.get('cv_chosen', 'fixed (no --cv)')} |")
    lines.append("")
    return lines


def _ranking_table(t: dict[str, Any]) -> list[str]:
    """How well each probe orders samples, within a prompt and pooled (empty if not known)."""
    ranks = {obj: pr["ranking"] for obj, pr in t["probes"].items() if pr.get("ranking")}
    if not ranks:
        return []
    n_mixed = next(iter(ranks.values()))["prompts_with_differing_rewards"]
    lines = [
        f"Ranking (mean over seeds; 0.5 is chance): 'within prompt' is P(Q_i > Q_j | "
        f"r_i > r_j) over pairs of one prompt's samples, averaged over the {n_mixed} "
        "prompts whose samples' rewards differ (what best-of-k needs); 'pooled' is the "
        "AUC over all samples, which also rewards telling easy prompts from hard ones.",
        "",
        "| probe | within prompt | pooled AUC |",
        "|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for obj, rk in ranks.items():
        lines.append(f"| `{obj}` | {fmt(rk['within_prompt'])} | {fmt(rk['pooled_auc'])} |")
    lines.append("")
    return lines


def _curve_table(res: dict[str, Any]) -> list[str]:
    """Reward vs number of training prompts: mean, min and max over the random subsets."""
    c = res["curve"]
    lines = [
        "## Reward vs number of training prompts",
        "",
        f"`{c['objective']}` probes, k = {c['k']}, beta = {c['beta']}, on "
        f"{next(iter(res['test']))}; {res['config']['curve']['subsets']} random prompt subsets "
        f"per size; inputs and steps: {c.get('inputs', 'the collection feature')}.",
        "",
        "| train prompts | mean | min | max |",
        "|---|---|---|---|",
    ]
    for size, vals in c["sizes"].items():
        lines.append(f"| {size} | {np.mean(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    lines.append("")
    if c.get("samples"):
        n = res["train"]["n_prompts"]
        lines += [
            f"Samples per train prompt, on all {n} train prompts (random draws of that many of "
            "each prompt's samples): at equal rows with the table above, more samples per prompt "
            "against more prompts.",
            "",
            "| samples per prompt | rows | mean | min | max |",
            "|---|---|---|---|---|",
        ]
        for m, vals in c["samples"].items():
            lines.append(f"| {m} | {int(m) * n} | {np.mean(vals):.3f} | {min(vals):.3f} | "
                         f"{max(vals):.3f} |")
        lines.append("")
    return lines


def plot_reward_vs_k(res: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = res["test"]
    beta = res["config"]["eval"]["beta"]
    fig, axes = plt.subplots(1, len(tests), figsize=(5.5 * len(tests), 4), squeeze=False)
    for ax, (label, t) in zip(axes[0], tests.items()):
        ks = [int(k) for k in t["pass@k"]]
        ax.plot(ks, [t["pass@k"][str(k)]["mean"] for k in ks], "k--", label="pass@k (skyline)")
        ax.axhline(t["pass@1"]["mean"], color="0.4", ls=":", label="pass@1")
        for name in ("greedy", "few_shot"):
            if name in t:
                ax.axhline(
                    t[name]["mean"],
                    color=BASELINE_COLORS[name],
                    ls="-.",
                    label=name.replace("_", "-"),
                )
        for obj, pr in t["probes"].items():
            per_seed = np.array(
                [[_probe_at(run, k, pr.get("beta", beta)) for k in ks] for run in pr["runs"].values()]
            )  # [seeds, len(ks)]
            line = ax.plot(ks, per_seed.mean(0), marker="o", label=f"probe {obj}")[0]
            ax.fill_between(ks, per_seed.min(0), per_seed.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (samples to choose from)")
        ax.set_ylabel("expected reward")
        ax.set_title(f"{label} (beta={beta} unless chosen by CV; band: min..max over seeds)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _probe_at(run: dict[str, Any], k: int, beta: float) -> float:
    for row in run["probe"]:
        if row["k"] == k and abs(row["beta"] - beta) < 1e-12:
            return row["mean"]
    return float("nan")


def plot_curve(res: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["curve"]
    t = next(iter(res["test"].values()))
    sizes = [int(s) for s in c["sizes"]]
    vals = [np.asarray(c["sizes"][str(s)]) for s in sizes]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(sizes, [v.mean() for v in vals], "o-", label=f"probe {c['objective']} (mean)")
    ax.fill_between(
        sizes,
        [v.min() for v in vals],
        [v.max() for v in vals],
        alpha=0.25,
        label="min..max over subsets",
    )
    ax.axhline(t["pass@1"]["mean"], color="0.4", ls=":", label="pass@1")
    ax.axhline(t["pass@k"][str(c["k"])]["mean"], color="k", ls="--", label=f"pass@{c['k']}")
    if "greedy" in t:
        ax.axhline(t["greedy"]["mean"], color=BASELINE_COLORS["greedy"], ls="-.", label="greedy")
    ax.set_xlabel("training prompts")
    ax.set_ylabel(f"expected reward (k={c['k']}, beta={c['beta']})")
    ax.set_title(f"{next(iter(res['test']))}: reward vs training prompts", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_score_vs_reward(res: dict[str, Any], path: Any, bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, t = next(iter(res["test"].items()))
    scores_by, rewards = t.get("_scores", {}), np.asarray(t.get("_rewards", []), dtype=float)
    objs = list(scores_by)
    fig, axes = plt.subplots(
        1, max(1, len(objs)), figsize=(4.2 * max(1, len(objs)), 3.6), squeeze=False
    )
    keep = ~np.isnan(rewards)
    for ax, obj in zip(axes[0], objs):
        for i, sc in enumerate(scores_by[obj]):
            s, r = np.asarray(sc)[keep], rewards[keep]
            edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
            idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
            xs = [s[idx == b].mean() for b in range(len(edges) - 1) if (idx == b).any()]
            ys = [r[idx == b].mean() for b in range(len(edges) - 1) if (idx == b).any()]
            ax.plot(xs, ys, "o-", ms=3, alpha=0.8, label=f"seed {i}")
        ax.axhline(rewards[keep].mean(), color="0.4", ls=":", label="mean reward")
        ax.set_xlabel(f"probe score ({obj})")
        ax.set_ylabel("mean reward in score decile")
        ax.set_title(f"{label}: {obj}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(res: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write results.md, results.json and the plots into out_dir (each file atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = _public(res)
    public["headline"] = headline_objective(public)
    # key order as built (not sorted): the file reads test sets first, config last
    atomic_write_text(out / "results.json", json.dumps(public, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(public))
    for name, fn, needed in (
        ("reward_vs_k.png", plot_reward_vs_k, True),
        ("reward_vs_train_prompts.png", plot_curve, "curve" in res and res["curve"]["sizes"]),
        ("score_vs_reward.png", plot_score_vs_reward, True),
    ):
        if needed:
            data = res if name == "score_vs_reward.png" else public  # it needs the arrays
            atomic_write(out / name, lambda f, fn=fn, data=data: fn(data, f))
    return out


def regenerate(exp_dir: str | os.PathLike) -> Path:
    """Rewrite EXP_DIR/report/results.md and results.json from the stored results.json, filling
    each probe's CV score from its saved probe (probes/<objective>-seed<s>/config.json) where
    an older run did not record it. The plots are left as they are (they need the scores)."""
    exp = Path(exp_dir)
    out = exp / "report"
    res = json.loads((out / "results.json").read_text())
    seed0 = res["config"]["probes"]["seeds"][0]
    for t in res["test"].values():
        for obj, pr in t["probes"].items():
            cfg_file = exp / "probes" / f"{obj}-seed{seed0}" / "config.json"
            if "cv_score" not in pr and pr.get("cv_chosen") and cfg_file.exists():
                cv = json.loads(cfg_file.read_text())["cv"]
                if cv["chosen"] != pr["cv_chosen"]:
                    raise ValueError(f"{cfg_file}: CV chose {cv['chosen']!r}, the report says "
                                     f"{pr['cv_chosen']!r}; the probes are not the report's")
                pr["cv_score"] = cv_score(cv)
    res["headline"] = headline_objective(res)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(res))
    return out


if __name__ == "__main__":  # python -m qprobe.experiment.report EXP_DIR [EXP_DIR ...]
    import sys

    for d in sys.argv[1:]:
        print(regenerate(d) / "results.md")
