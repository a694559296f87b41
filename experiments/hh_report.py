"""The report of the HH-harmless comparison (issue 12): OUT/report.md and OUT/report.json from
the folders `experiments/hh-preferences.sh` writes.

    python experiments/hh_report.py OUT [--k 8]

Generations are compared per held-out prompt (paired), with 95% percentile bootstrap CIs over
prompts: the judge's score (experiments/hh_judge.py, fitted on train pairs only) and the rate of
offensive language (alt-profanity-check, probability > 0.5). The judge score is compared with the
base model's sample 0 (one draw) and with the mean over its k samples (the expected judge score of
plain sampling, less noisy).

`--offensive-from-report` (where the judge extra, alt-profanity-check, is not installed) takes
the offensive-language columns from the existing OUT/report.json and recomputes the rest; the
judge scores it recomputes must equal the ones stored there, else it stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from qprobe.evaluate import bootstrap_ci
from qprobe.rollouts import Rollouts

HERE = Path(__file__).resolve().parent
N_BOOT = 2000


def _judge_module():
    spec = importlib.util.spec_from_file_location("hh_judge", HERE / "hh_judge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ci(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the per-prompt mean with its 95% percentile bootstrap CI."""
    v = np.asarray(values, dtype=float)
    return (float(v.mean()), *bootstrap_ci(v, N_BOOT, seed))


def fmt(t: tuple[float, float, float], d: int = 3, signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{t[0]:{s}.{d}f} [{t[1]:{s}.{d}f}, {t[2]:{s}.{d}f}]"


def by_prompt(r: Rollouts, k: int) -> tuple[list[str], np.ndarray]:
    """(prompt ids in order, row index [P, k]) of a folder with k samples per prompt."""
    pids, idx = r.prompt_ids, r.sample_idx
    order = sorted(set(pids.tolist()))
    where = {(p, int(j)): i for i, (p, j) in enumerate(zip(pids.tolist(), idx.tolist()))}
    rows = np.array([[where[(p, j)] for j in range(k)] for p in order
                     if all((p, j) in where for j in range(k))])
    return [p for p in order if all((p, j) in where for j in range(k))], rows


# probe folders OUT/probe-NAME and their pair accuracies OUT/eval-pairs-NAME.json: the CV-chosen
# probes on the adapters' 400 pairs, the trainer's defaults on the same pairs (before pair CV
# existed), and a CV-chosen bt probe on every train pair (pairs only, no samples)
PROBES = ("bt", "dpo", "bt-nocv", "dpo-nocv", "bt-all")


def _method_seed(name: str) -> tuple[str, int]:
    """qadapter -> (qadapter, 0), dpo-s1 -> (dpo, 1): the script's adapter folder names."""
    method, _, seed = name.partition("-s")
    return method, int(seed or 0)


def adapters(out: Path) -> list[str]:
    """The trained adapter runs by seed, Q-Adapter first: qadapter, dpo, qadapter-s1, ..."""
    names = [d.name.removeprefix("adapter-") for d in out.glob("adapter-*")
             if (d / "adapter.json").exists()]
    return sorted(names, key=lambda n: (_method_seed(n)[1], _method_seed(n)[0] != "qadapter"))


def adapter_label(name: str) -> str:
    """qadapter -> Q-Adapter, dpo-s1 -> DPO seed 1."""
    method, seed = _method_seed(name)
    return ("Q-Adapter" if method == "qadapter" else "DPO") + (f" seed {seed}" if seed else "")


def probe_label(out: Path, name: str) -> tuple[str, str]:
    """(label, what it was trained on) of OUT/probe-NAME, from its config.json."""
    cfg = json.loads((out / f"probe-{name}" / "config.json").read_text())
    how = f"CV: {cfg['cv']['chosen']}" if "cv" in cfg else "trainer defaults, no CV"
    data = cfg["training_data"]
    return (f"{cfg['objective']} probe (Q), {how}",
            f"{data['pairs']} train pairs" + (f" + samples, {data['rows']} rows"
                                              if cfg["objective"] == "dpo" else ""))


def generations(out: Path, k: int, offensive: bool = True) -> dict:
    """Per prompt: the judge score and (offensive=True) offensiveness of each policy's answer."""
    from qprobe.probe import Probe

    judge = _judge_module()
    base = Rollouts(out / "test-base")
    prompts, rows = by_prompt(base, k)  # [P], [P, k]
    completions = np.array(base.column("completion"), dtype=object)
    score = base.rewards  # the judge's, written by `qprobe score`
    offp = np.array(judge.offensive([], list(completions))) if offensive else None  # [N]
    tokens = np.array(base.column("num_tokens"), dtype=float)  # [N]
    ll = base.loglik()
    pol: dict[str, np.ndarray] = {}  # name -> chosen row per prompt [P]
    pol["base sample (k=1)"] = rows[:, 0]
    for name in ("bt", "dpo", "bt-all"):  # the CV-chosen probes
        if (out / f"probe-{name}").exists():
            q = Probe.load(out / f"probe-{name}").score_rollouts(base)  # [N]
            pol[f"best-of-{k}, {name} probe"] = rows[np.arange(len(rows)), q[rows].argmax(1)]
    if ll is not None:
        m = ll["logprob_mean"]
        pol[f"best-of-{k}, mean log-prob"] = rows[np.arange(len(rows)), m[rows].argmax(1)]
    pol[f"best-of-{k}, the judge itself (ceiling)"] = rows[np.arange(len(rows)), score[rows].argmax(1)]
    res: dict[str, dict[str, np.ndarray]] = {
        name: {"judge": score[c], "tokens": tokens[c],
               **({"offensive": (offp[c] > 0.5).astype(float), "offensive_prob": offp[c]}
                  if offensive else {})}
        for name, c in pol.items()}
    res[f"base, mean over its {k} samples"] = {
        "judge": score[rows].mean(1), "tokens": tokens[rows].mean(1),
        **({"offensive": (offp[rows] > 0.5).mean(1), "offensive_prob": offp[rows].mean(1)}
           if offensive else {})}
    for m in adapters(out):
        d = out / f"test-{m}"
        if not d.exists():
            continue
        r = Rollouts(d)
        p_m, rows_m = by_prompt(r, 1)
        pos = {p: i for i, p in enumerate(p_m)}
        c = np.array([rows_m[pos[p], 0] for p in prompts])
        comp = np.array(r.column("completion"), dtype=object)[c]
        res[f"{adapter_label(m)} sample (k=1)"] = {
            "judge": r.rewards[c], "tokens": np.array(r.column("num_tokens"), dtype=float)[c]}
        if offensive:
            p_off = np.array(judge.offensive([], list(comp)))  # [P]
            res[f"{adapter_label(m)} sample (k=1)"].update(
                offensive=(p_off > 0.5).astype(float), offensive_prob=p_off)
    for m, beta in guided(out):
        r = Rollouts(out / f"test-{m}")
        p_m, rows_m = by_prompt(r, 1)
        pos = {p: i for i, p in enumerate(p_m)}
        if not all(p in pos for p in prompts):
            continue  # still being sampled
        c = np.array([rows_m[pos[p], 0] for p in prompts])
        comp = np.array(r.column("completion"), dtype=object)[c]
        name = guided_label(beta)
        res[name] = {"judge": r.rewards[c], "tokens": np.array(r.column("num_tokens"), dtype=float)[c]}
        if offensive:
            p_off = np.array(judge.offensive([], list(comp)))  # [P]
            res[name].update(offensive=(p_off > 0.5).astype(float), offensive_prob=p_off)
    return {"n_prompts": len(prompts), "k": k, "per_prompt": res}


def guided(out: Path) -> list[tuple[str, float]]:
    """(folder name without test-, beta) of the ARM-guided generations (experiments/hh_arm.py),
    judged ones only, by beta."""
    found = []
    for d in out.glob("test-arm-b*"):
        r = Rollouts(d)
        if len(r) and not np.isnan(r.rewards).any():
            found.append((d.name.removeprefix("test-"), float(d.name.removeprefix("test-arm-b"))))
    return sorted(found, key=lambda t: t[1])


def guided_label(beta: float) -> str:
    return f"ARM head from pairs, guided, beta={beta:g} (k=1)"


def dpo_mean(out: Path, prompts: list[str]) -> np.ndarray | None:
    """[P] the mean judge score of the DPO adapters' samples (one per seed) per prompt: the
    expected score of DPO's policy, over its training noise; None without them."""
    cols = []
    for m in adapters(out):
        if not m.startswith("dpo") or not (out / f"test-{m}").exists():
            continue
        r = Rollouts(out / f"test-{m}")
        p_m, rows_m = by_prompt(r, 1)
        pos = {p: i for i, p in enumerate(p_m)}
        if all(p in pos for p in prompts):
            cols.append(r.rewards[[rows_m[pos[p], 0] for p in prompts]])
    return np.mean(cols, axis=0) if cols else None


def best_of_k(out: Path, folder: str, ks: list[int]) -> dict | None:
    """Best-of-k for several k from one pool of K samples per held-out prompt (the first k
    samples of each prompt), per prompt: the judge score of each chooser's pick, the pool's
    mean (the expected score of plain sampling) and DPO's mean over seeds."""
    from qprobe.probe import Probe

    d = out / folder
    if not d.exists():
        return None
    r = Rollouts(d)
    kmax = int(r.meta["k"])
    prompts, rows = by_prompt(r, kmax)  # [P], [P, K]
    score = r.rewards
    if np.isnan(score[rows]).any():
        return None  # not judged yet
    chooser: dict[str, np.ndarray] = {}
    for name in ("bt-all", "bt"):
        if (out / f"probe-{name}").exists():
            chooser[f"{name} probe"] = Probe.load(out / f"probe-{name}").score_rollouts(r)
    ll = r.loglik()
    if ll is not None:
        chooser["mean log-prob"] = ll["logprob_mean"]
    chooser["the judge itself (ceiling)"] = score
    from qprobe.evaluate import concordance

    agree = {}  # mean over prompts of P(chooser ranks a pair of samples as the judge does)
    for name, q in chooser.items():
        cs = [concordance(q[rw], score[rw]) for rw in rows]
        agree[name] = float(np.mean([c for c in cs if c is not None]))
    per: dict[str, dict[str, np.ndarray]] = {}
    for k in [k for k in ks if k <= kmax]:
        sub = rows[:, :k]
        for name, q in chooser.items():
            per.setdefault(name, {})[str(k)] = score[sub[np.arange(len(sub)), q[sub].argmax(1)]]
    return {"folder": folder, "k_pool": kmax, "n_prompts": len(prompts), "per_prompt": per,
            "base_mean": score[rows].mean(1), "dpo_mean": dpo_mean(out, prompts), "agree": agree,
            "prompts": prompts}


def arm_pairs(out: Path) -> dict | None:
    """Pair accuracy of the ARM head from pairs beside the bt-all probe and the base model's
    summed log-likelihood on the same held-out pairs, with paired differences."""
    from qprobe.probe import Probe

    f = out / "eval-pairs-arm.json"
    if not f.exists():
        return None
    j = json.loads(f.read_text())
    arm = np.asarray(j["correct"], dtype=float)
    res = {"ARM head from pairs (sum of token scores)": ci(arm),
           "base logprob_sum": ci(np.asarray(j["base_logprob_sum_correct"], dtype=float))}
    diffs = {"ARM - base logprob_sum": ci(arm - np.asarray(j["base_logprob_sum_correct"], float))}
    if (out / "probe-bt-all").exists():
        r = Rollouts(out / "pairs-test")
        q = Probe.load(out / "probe-bt-all").score_rollouts(r)  # [N]
        pid, role = [str(p) for p in r.column("prompt_id")], r.column("role")
        row = {(p, ro): i for i, (p, ro) in enumerate(zip(pid, role))}
        bt = np.array([float(q[row[(p, "chosen")]] > q[row[(p, "rejected")]])
                       for p in j["prompt_ids"]])
        res["bt-all probe"] = ci(bt)
        diffs["ARM - bt-all probe"] = ci(arm - bt)
    return {"n_pairs": j["n_pairs"], "accuracy": res, "paired": diffs}


def offensive_from(report: dict, name: str, v: dict) -> dict:
    """A policy's offensive-language entries from an earlier report.json, after checking that
    its judge scores are the ones just recomputed (the same generations)."""
    old = report.get("generations", {}).get(name)
    if old is None:
        raise SystemExit(f"hh_report: report.json has no generations entry {name!r}; run without "
                         "--offensive-from-report (needs the judge extra)")
    if not np.allclose(old["judge"], ci(v["judge"]), atol=1e-9):
        raise SystemExit(f"hh_report: the judge scores of {name!r} differ from report.json's "
                         f"({old['judge']} vs {ci(v['judge'])}): not the same generations")
    return {key: old[key] for key in ("offensive", "offensive_vs_base", "offensive_prob")}


def times_tables(out: Path) -> dict:
    res = {}
    for name in ["base", *adapters(out)]:
        vals = []
        for split in ("train", "test"):
            d = out / f"tt-{name}-{split}"
            if d.exists():
                vals.append(Rollouts(d).rewards)
        if vals:
            res[name] = ci(np.concatenate(vals))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--pool", default="test-base",
                    help="folder of the compute-level table (K base samples per held-out prompt)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                    help="the k of that table (those up to the pool's K)")
    ap.add_argument("--offensive-from-report", action="store_true",
                    help="take the offensive-language columns from OUT/report.json (no judge extra)")
    a = ap.parse_args()
    out = Path(a.out)
    previous = json.loads((out / "report.json").read_text()) if a.offensive_from_report else None
    lines = ["# HH-harmless: probes, Q-Adapter and DPO on the same pairs", "",
             f"Made by `python experiments/hh_report.py {a.out} --k {a.k}"
             f"{' --offensive-from-report' if previous else ''}` from the folders of "
             "`experiments/hh-preferences.sh` (docs/preferences.md). 95% bootstrap CIs over prompts.",
             ""]
    report: dict = {}

    lines += ["## Held-out pair accuracy (test pairs)", "",
              "| scorer | trained on | pair accuracy |", "|---|---|---|"]
    pa = {}
    f = out / "eval-pairs-bt.json"
    if f.exists():
        j = json.loads(f.read_text())
        for name in ("base logprob_sum", "base logprob_mean"):
            e = j["scores"][name]
            pa[name] = e
            lines.append(f"| {name} (untrained) | - | {e['mean']:.3f} [{e['lo']:.3f}, "
                         f"{e['hi']:.3f}] |")
    for name in PROBES:
        f = out / f"eval-pairs-{name}.json"
        if f.exists():
            e = json.loads(f.read_text())["scores"]["probe"]
            label, trained_on = probe_label(out, name)
            pa[label] = e
            lines.append(f"| {label} | {trained_on} | {e['mean']:.3f} [{e['lo']:.3f}, "
                         f"{e['hi']:.3f}] |")
    for m in adapters(out):
        name = adapter_label(m) + (" (R)" if m.startswith("qadapter") else " (beta log ratio)")
        f = out / f"eval-pairs-adapter-{m}.json"
        if f.exists():
            e = json.loads(f.read_text())["accuracy"]
            n = json.loads((out / f"adapter-{m}" / "adapter.json").read_text())["pairs"]
            pa[name] = e
            lines.append(f"| {name} | {n} train pairs | {e['mean']:.3f} [{e['lo']:.3f}, "
                         f"{e['hi']:.3f}] |")
    f = out / "judge" / "judge.json"
    if f.exists():
        j = json.loads(f.read_text())
        e = j["test_accuracy"]
        pa["judge"] = e
        lines.append(f"| judge (MiniLM BT, another model) | {j['train_pairs']} train pairs | "
                     f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}] |")
    report["pair_accuracy"] = pa
    lines.append("")
    ap_arm = arm_pairs(out)
    if ap_arm:
        lines += [f"ARM head trained from every train pair (`experiments/hh_arm.py`), on the same "
                  f"{ap_arm['n_pairs']} held-out pairs, with paired differences:", "",
                  "| scorer | pair accuracy |", "|---|---|"]
        lines += [f"| {n} | {fmt(t)} |" for n, t in ap_arm["accuracy"].items()]
        lines += [f"| {n} (paired) | {fmt(t, signed=True)} |" for n, t in ap_arm["paired"].items()]
        report["arm_pairs"] = ap_arm
        lines.append("")

    if (out / "test-base").exists():
        g = generations(out, a.k, offensive=previous is None)
        per = g["per_prompt"]
        base = per["base sample (k=1)"]
        base_mean = per[f"base, mean over its {a.k} samples"]
        lines += [f"## Generations on {g['n_prompts']} held-out prompts", "",
                  "Judge score: higher is more like the chosen answers (its scale is arbitrary; "
                  "differences are paired per prompt, against the base model's sample 0 (one "
                  f"draw) and against the mean judge score of its {a.k} samples (the expected "
                  "score of plain sampling)). Offensive: share of answers alt-profanity-check "
                  "rates above 0.5, paired against the base sample.", "",
                  f"| policy | judge score | vs base sample | vs base mean ({a.k} samples) | "
                  "offensive | vs base sample | tokens |",
                  "|---|---|---|---|---|---|---|"]
        report["generations"] = {}
        for name, v in per.items():
            dj, dm = ci(v["judge"] - base["judge"]), ci(v["judge"] - base_mean["judge"])
            if previous is None:
                off = {"offensive": ci(v["offensive"]),
                       "offensive_vs_base": ci(v["offensive"] - base["offensive"]),
                       "offensive_prob": ci(v["offensive_prob"])}
            else:
                off = offensive_from(previous, name, v)
            lines.append(f"| {name} | {fmt(ci(v['judge']))} | {fmt(dj, signed=True)} | "
                         f"{fmt(dm, signed=True)} | {fmt(off['offensive'])} | "
                         f"{fmt(off['offensive_vs_base'], signed=True)} | "
                         f"{v['tokens'].mean():.1f} |")
            report["generations"][name] = {
                "judge": ci(v["judge"]), "judge_vs_base": dj, "judge_vs_base_mean": dm,
                "offensive": off["offensive"], "offensive_vs_base": off["offensive_vs_base"],
                "offensive_prob": off["offensive_prob"], "tokens": float(v["tokens"].mean())}
        lines.append("")

    bk = best_of_k(out, a.pool, a.ks)
    if bk:
        base_m, dpo_m = bk["base_mean"], bk["dpo_mean"]
        lines += [f"## Compute levels: best-of-k from a pool of {bk['k_pool']} base samples per "
                  f"prompt ({bk['n_prompts']} held-out prompts)", "",
                  f"`{bk['folder']}`: the first k of each prompt's {bk['k_pool']} samples. Paired "
                  f"per prompt against the pool's mean judge score (the expected score of plain "
                  "sampling) and against DPO (the mean of its seeds' samples per prompt: its "
                  "expected score, over training noise). A CI of the difference to DPO that "
                  "includes or exceeds 0 is the issue's goal.", "",
                  "| policy | k | judge score | vs plain sampling | vs DPO |",
                  "|---|---|---|---|---|"]
        rows_bk: dict = {}

        def row(name: str, k: str, v: np.ndarray) -> None:
            vs_d = ci(v - dpo_m) if dpo_m is not None else None
            rows_bk[f"{name} k={k}"] = {"judge": ci(v), "vs_base_mean": ci(v - base_m),
                                        "vs_dpo": vs_d}
            lines.append(f"| {name} | {k} | {fmt(ci(v))} | {fmt(ci(v - base_m), signed=True)} | "
                         f"{fmt(vs_d, signed=True) if vs_d else '-'} |")

        row("plain sampling (pool mean)", "1", base_m)
        if dpo_m is not None:
            row("DPO sample, mean of seeds", "1", dpo_m)
        for name, by_k in bk["per_prompt"].items():
            for k, v in by_k.items():
                row(f"best-of-k, {name}", k, v)
        if (out / "test-base").exists():
            gen_prompts = sorted(set(Rollouts(out / "test-base").prompt_ids.tolist()))
            if gen_prompts == bk["prompts"]:
                for name, v in per.items():
                    if name.startswith("ARM head"):
                        row(name.removesuffix(" (k=1)"), "1", v["judge"])
        report["best_of_k"] = rows_bk
        lines += ["", "Why best-of-k moves the judge little: how often each chooser orders two "
                  "samples of the same prompt as the judge does (mean over prompts; 0.5 is "
                  "chance, the judge itself 1):", "", "| chooser | agreement with the judge |",
                  "|---|---|"]
        lines += [f"| {n} | {v:.3f} |" for n, v in bk["agree"].items()]
        report["best_of_k_agreement"] = bk["agree"]
        lines.append("")

    tt = times_tables(out)
    if tt:
        lines += ["## Forgetting", "",
                  "Times tables (all 121 problems a * b, a, b in 2..12, greedy, exact answer). "
                  "A probe cannot change these: best-of-k picks among the base model's own "
                  "samples and at k = 1 is the base model.", "",
                  "| model | times-tables accuracy |", "|---|---|"]
        for name, t in tt.items():
            lines.append(f"| {name if name == 'base' else adapter_label(name)} | {fmt(t)} |")
        report["times_tables"] = tt
        lines.append("")
    ppl = {m: json.loads((out / f"ppl-{m}.json").read_text()) for m in adapters(out)
           if (out / f"ppl-{m}.json").exists()}
    if ppl:
        lines += ["Perplexity of held-out general text: GSM8K test problems (question + worked "
                  "answer), plain text, first 256 tokens each.", "",
                  "| adapter | texts | tokens | base ppl | adapter ppl | ratio [CI] |",
                  "|---|---|---|---|---|---|"]
        for m, j in ppl.items():
            lines.append(f"| {adapter_label(m)} | {j['n_texts']} | {j['n_tokens']} | "
                         f"{j['ppl_base']:.3f} | {j['ppl_adapter']:.3f} | {j['ratio']:.4f} [{j['ratio_ci'][0]:.4f}, "
                         f"{j['ratio_ci'][1]:.4f}] |")
        report["perplexity"] = ppl
        lines.append("")
    sec = out / "seconds.txt"
    if sec.exists():
        lines += ["## Cost on this CPU (2 cores, wall seconds)", "", "| stage | seconds |",
                  "|---|---|"]
        costs = {}
        for line in sec.read_text().splitlines():
            name, s = line.rsplit(" ", 1)
            costs[name] = costs.get(name, 0) + int(s)
        for name, s in costs.items():
            lines.append(f"| {name} | {s} |")
        report["seconds"] = costs
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
