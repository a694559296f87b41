"""Every results table in README.md and docs/ equals the committed report it cites.

Each table is declared once below: the document, a text just above it (the anchor: the table is
the first one after it), the report file, and for every row (by its first cell, exactly) the
numbers its other cells must show, computed from the report's JSON. The check runs both ways:
every number in a declared row must be the report's, and every row of a declared table must be
declared (a new or renamed row fails until it is declared here). A few sentences that quote a
report are declared the same way. Numbers are compared as the docs print them (rounded), with
U+2212 read as a minus and thousands separators dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MBPP = "results/mbpp-qwen-coder/report/results.json"
VISIBLE = "results/mbpp-qwen-coder-visible/report/results.json"
RUN_1201 = "results/mbpp-qwen-coder/run-2026-12-01/results.json"
RUN_1202 = "results/mbpp-qwen-coder/run-2026-12-02/results.json"
HH = "results/hh-preferences/report.json"
DEMO = "results/demo/report/results.json"
SENTIMENT = "results/sentiment-guided/report/results.json"
VERIFIER = "results/mbpp-qwen-coder-verifier/report/results.json"
PAL = "results/gsm8k-pal-qwen-coder/report/results.json"
PAL_API = "results/gsm8k-pal-api/api-{}/report/results.json"  # smollm2 / qwen features
PAL_API_TIMING = "results/gsm8k-pal-api/timing.json"
SENT_RUN = "results/sentiment-guided-run/compare.json"  # the YAML run against the driver
NUM = re.compile(r"(?:(?<![\w@])[+\-\u2212])?\d[\d,]*(?:\.\d+)?")  # "best-of-16" is 16, not -16


@cache
def report(path: str) -> Any:
    return json.loads((ROOT / path).read_text())


@cache
def doc(path: str) -> str:
    return (ROOT / path).read_text()


# ------------------------------------------------------------------ numbers as the docs print them


def _norm(s: str) -> str:
    s = s.replace("\u2212", "-").replace(",", "").lstrip("+")
    return "0" + s[2:] if re.fullmatch(r"-0(\.0+)?", s) else s  # -0.000 reads as 0.000


def n(v: float, d: int = 3) -> list[str]:
    """One number printed with d decimals."""
    return [_norm(f"{v:.{d}f}")]


def ci(e: Any, d: int = 3) -> list[str]:
    """mean [lo, hi] of an estimate: a dict with mean/lo/hi or a (mean, lo, hi) list."""
    vals = (e["mean"], e["lo"], e["hi"]) if isinstance(e, dict) else e
    return [x for v in vals for x in n(v, d)]


def pct(x: float) -> list[str]:
    """A share printed as a whole percentage (the report's `:.0%`)."""
    return [_norm(f"{x:.0%}".rstrip("%"))]


def lit(*s: str) -> list[str]:
    """Numbers that come from no report (the paper's table, a stated size)."""
    return [_norm(x) for x in s]


def numbers_in(text: str) -> list[str]:
    return [_norm(m) for m in NUM.findall(text.replace("**", ""))]


# ------------------------------------------------------------------ the declared tables


@dataclass
class Table:
    doc: str
    anchor: str  # text before the table; the table is the first one after it
    rows: dict[str, list[str]]  # first cell -> the numbers of the other cells, in order
    cols: tuple[int, ...] | None = None  # which cells hold checked numbers (None: all but the first)
    reports: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        text = doc(self.doc)
        assert text.count(self.anchor) == 1, f"{self.doc}: anchor {self.anchor!r} not found once"
        rest = text[text.index(self.anchor):].splitlines()
        start = next(i for i, line in enumerate(rest) if line.startswith("|"))
        table = []
        for line in rest[start:]:
            if not line.startswith("|"):
                break
            table.append(line)
        return table[2:]  # without the header and the |---| line


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def mbpp_tables() -> list[Table]:
    m, h = report(MBPP)["test"]["mbpp-test"], report(MBPP)["test"]["humaneval"]
    vm, vh = report(VISIBLE)["test"]["mbpp-test"], report(VISIBLE)["test"]["humaneval"]
    o1 = report(RUN_1201)["test"]
    a1, b1 = o1["mbpp-test"], o1["humaneval"]
    o2 = report(RUN_1202)["test"]
    a2, b2 = o2["mbpp-test"], o2["humaneval"]

    def p1(t):
        return t["pass@1"]["mean"]

    def pk(t):
        return t["pass@k"]["16"]["mean"]

    def head(t, v):  # share of the pass@1 -> pass@16 headroom
        return pct((v - p1(t)) / (pk(t) - p1(t)))

    def probe(t, obj):
        return t["probes"][obj]["mean_over_seeds"]["mean"]

    def ph(t, obj):  # probe and its headroom
        return n(probe(t, obj)) + head(t, probe(t, obj))

    def rr(t, key="rerank_mean_logprob"):
        return n(t[key]["mean"]) + head(t, t[key]["mean"])

    def paired(t, obj, key):
        return ci(t["probes"][obj]["paired"][key])

    readme = Table("README.md", "| method | MBPP test | HumanEval | paper, MBPP (k = 48) |", {
        "base pass@1": n(p1(m)) + n(p1(h)) + lit("0.294", "0.243"),
        "greedy": n(m["greedy"]["mean"]) + n(h["greedy"]["mean"]) + lit("0.376", "0.305"),
        "rerank by mean token log-prob (k = 16)": n(m["rerank_mean_logprob"]["mean"])
        + n(h["rerank_mean_logprob"]["mean"]),
        "probe `q`": n(probe(m, "q")) + n(probe(h, "q")) + lit("0.377", "0.289"),
        "probe `ce`": ph(m, "ce") + n(probe(h, "ce")) + lit("0.397", "0.321"),
        "probe `pg`, chosen on train (best CV)": ph(m, "pg") + n(probe(h, "pg"))
        + lit("0.457", "0.346"),
        "filter by the prompt's shown test, then mean log-prob": rr(vm, "rerank_visible")
        + n(vh["rerank_visible"]["mean"]),
        "probe `pg` with the shown test as an input, chosen on train (best CV)": ph(vm, "pg")
        + n(probe(vh, "pg")),
        "pass@k skyline": n(pk(m)) + n(pk(h)) + lit("0.756", "0.771"),
    }, reports=[MBPP, VISIBLE])
    first = Table("docs/evaluation.md", "This first run's report (2026-12-01", {
        "base pass@1": ci(a1["pass@1"]) + ci(b1["pass@1"]) + lit("0.294", "0.243"),
        "greedy": ci(a1["greedy"]) + ci(b1["greedy"]) + lit("0.376", "0.305"),
        "5-shot on successes": n(a1["few_shot"]["mean"]) + n(b1["few_shot"]["mean"]),
        **{f"probe `{o}`": ph(a1, o) + n(probe(b1, o)) + head(b1, probe(b1, o)) + lit(*paper)
           for o, paper in (("q", ("0.377", "0.289")), ("ce", ("0.397", "0.321")),
                            ("pg", ("0.457", "0.346")))},
        "pass@k skyline": n(pk(a1)) + lit("16") + n(pk(b1)) + lit("0.756", "0.771"),
    }, reports=[RUN_1201])
    dec03 = Table("docs/evaluation.md", "the one with the highest mean token log-probability. 104 settings", {
        "base pass@1": n(p1(m)) + n(p1(h)),
        "greedy": ci(m["greedy"]) + ci(h["greedy"]),
        "rerank by mean token log-prob (k = 16)": rr(m) + rr(h),
        "**model's view only** (features, log-likelihoods)": [],
        "`q` (CV: L12-mean + log-lik, 1000 steps, lr 1e-3, beta 0)": ph(m, "q") + n(probe(h, "q")),
        "`ce` (CV: L12-mean + log-lik, 3000 steps, lr 1e-3, beta 0.03)": ph(m, "ce")
        + n(probe(h, "ce")),
        "`pg` (CV: L12-mean, 3000 steps, lr 5e-5, beta 0), chosen on train": ph(m, "pg")
        + n(probe(h, "pg")),
        "**with the prompt's shown tests**": [],
        "filter by the shown tests, then mean log-prob (no training)": rr(vm, "rerank_visible")
        + rr(vh, "rerank_visible"),
        "`q` (CV: log-lik + visible, no hidden state, beta 0)": ph(vm, "q") + ph(vh, "q"),
        "`ce` (CV: L23-mean + log-lik + visible, lr 1e-3, beta 0)": ph(vm, "ce") + ph(vh, "ce"),
        "`pg` (CV: log-lik + visible, no hidden state, beta 0), chosen on train": ph(vm, "pg")
        + ph(vh, "pg"),
        "pass@16": n(pk(m)) + n(pk(h)),
    }, reports=[MBPP, VISIBLE])
    dec03_paired = Table("docs/evaluation.md", "Paired differences (same prompts, 95% bootstrap CI over prompts):", {
        "`pg`, model's view (chosen on train)": paired(m, "pg", "vs_greedy")
        + paired(h, "pg", "vs_greedy") + paired(m, "pg", "vs_rerank_mean_logprob"),
        "`ce`, model's view (best on test)": paired(m, "ce", "vs_greedy")
        + paired(h, "ce", "vs_greedy") + paired(m, "ce", "vs_rerank_mean_logprob"),
        **{f"`{o}`, with shown tests": paired(vm, o, "vs_greedy") + paired(vh, o, "vs_greedy")
           + paired(vm, o, "vs_rerank_mean_logprob") + paired(vm, o, "vs_rerank_visible")
           + paired(vh, o, "vs_rerank_visible") for o in ("q", "pg")},
    }, reports=[MBPP, VISIBLE])
    wg = a2["probes"]["pg"]["with_greedy"]["beta=0"]["mean"]
    dec02 = Table("docs/evaluation.md", "`results/mbpp-qwen-coder/run-2026-12-02/results.md`", {
        "base pass@1": n(p1(a2)) + n(p1(b2)),
        "greedy": ci(a2["greedy"]) + ci(b2["greedy"]),
        "rerank by mean token log-prob (k = 16)": rr(a2) + rr(b2),
        "rerank by sum token log-prob": n(a2["rerank_sum_logprob"]["mean"])
        + n(b2["rerank_sum_logprob"]["mean"]),
        "`q` (CV: L12-mean + log-lik, 3000 steps)": ph(a2, "q") + n(probe(b2, "q")),
        "`ce` (CV: L12-mean + log-lik, 3000 steps)": ph(a2, "ce") + n(probe(b2, "ce")),
        "`pg` (CV: L23-mean, 1000 steps)": ph(a2, "pg") + n(probe(b2, "pg")),
        "`pg`, greedy + 15 samples, beta = 0": n(wg) + head(a2, wg)
        + n(b2["probes"]["pg"]["with_greedy"]["beta=0"]["mean"]),
        "pass@16": n(pk(a2)) + n(pk(b2)),
    }, reports=[RUN_1202])
    vt = report(VERIFIER)["test"]
    vm2, vh2 = vt["mbpp-test"], vt["humaneval"]
    verifier = Table("README.md", "| method (k = 16) | MBPP test | HumanEval |", {
        "filter by the shown test, then mean log-prob (free)":
            n(vm2["rules"]["shown_test_filter"]["mean"]) + n(vh2["rules"]["shown_test_filter"]["mean"]),
        "error class of the shown test, then mean log-prob (free)":
            n(vm2["rules"]["shown_test_error_class"]["mean"])
            + n(vh2["rules"]["shown_test_error_class"]["mean"]),
        "MBR-exec on calls next to the shown ones (free)":
            n(vm2["rules"]["mbr_exec_nearby_inputs"]["mean"])
            + n(vh2["rules"]["mbr_exec_nearby_inputs"]["mean"]),
        "learned: `pg` chosen on train (log-lik, shown test, nearby agreement, error class)":
            n(probe(vm2, "pg")) + n(probe(vh2, "pg")),
        "learned minus the filter, paired": paired(vm2, "pg", "vs_shown_test_filter")
            + paired(vh2, "pg", "vs_shown_test_filter"),
    }, reports=[VERIFIER])
    return [readme, first, dec03, dec03_paired, dec02, verifier]


def hh_tables() -> list[Table]:
    r = report(HH)
    pa, gen, sec = r["pair_accuracy"], r["generations"], r["seconds"]
    bt, dpo = "bt probe (Q), CV: L23-last wd=0 steps=100", "dpo probe (Q), CV: L23-last+loglik wd=0.1 steps=10000"
    bt_all = "bt probe (Q), CV: L23-last wd=1 steps=1000"

    def g(name, *keys):
        return [x for k in keys for x in ci(gen[name][k])]

    readme = Table("README.md", "| method | held-out pair accuracy | judge score vs the base sample (paired) |", {
        "base summed log-likelihood (untrained)": ci(pa["base logprob_sum"]),
        "bt probe, CV; best-of-8": ci(pa[bt]) + g("best-of-8, bt probe", "judge_vs_base", "judge_vs_base_mean")
        + n(sec["probe-bt"], 0),
        "dpo probe, CV; best-of-8": ci(pa[dpo]) + g("best-of-8, dpo probe", "judge_vs_base", "judge_vs_base_mean")
        + n(sec["probe-dpo"], 0),
        "Q-Adapter": ci(pa["Q-Adapter (R)"]) + g("Q-Adapter sample (k=1)", "judge_vs_base", "judge_vs_base_mean")
        + n(sec["adapt-qadapter"], 0),
        "DPO": ci(pa["DPO (beta log ratio)"]) + g("DPO sample (k=1)", "judge_vs_base", "judge_vs_base_mean")
        + n(sec["adapt-dpo"], 0),
        "bt probe, CV, all 1,803 train pairs; best-of-8": ci(pa[bt_all])
        + g("best-of-8, bt-all probe", "judge_vs_base", "judge_vs_base_mean")
        + n(sec["probe-bt-all"], 0) + n(sec["collect-train-all"], 0),
        "ARM head (token level), all 1,803 train pairs; guided, beta 1":
            ci(r["arm_pairs"]["accuracy"]["ARM head from pairs (sum of token scores)"])
            + g("ARM head from pairs, guided, beta=1 (k=1)", "judge_vs_base", "judge_vs_base_mean")
            + n(sec["arm-train-head"], 0),
    }, reports=[HH])
    bk = r["best_of_k"]

    def lvl(key, skip=()):  # judge, vs plain sampling, vs DPO; "-" where the row is the reference
        e = bk[key]
        return [x for part in ("judge", "vs_base_mean", "vs_dpo") if part not in skip
                for x in ci(e[part])]

    levels = Table("docs/preferences.md", "| policy | judge score | vs plain sampling | vs DPO |", {
        "plain sampling (mean of 8 samples)": lvl("plain sampling (pool mean) k=1", ("vs_base_mean",)),
        "DPO sample, mean of seeds": lvl("DPO sample, mean of seeds k=1", ("vs_dpo",)),
        "best-of-2, bt probe (400 pairs)": lvl("best-of-k, bt probe k=2"),
        "best-of-4, bt probe (400 pairs)": lvl("best-of-k, bt probe k=4"),
        "best-of-8, bt probe (400 pairs)": lvl("best-of-k, bt probe k=8"),
        "best-of-8, bt-all probe (1,803 pairs)": lvl("best-of-k, bt-all probe k=8"),
        "ARM head from all 1,803 pairs, guided, beta = 1":
            lvl("ARM head from pairs, guided, beta=1 k=1"),
        "best-of-8 by the judge itself (a ceiling)": lvl("best-of-k, the judge itself (ceiling) k=8"),
    }, reports=[HH])
    accuracy = Table("docs/preferences.md", "**Held-out pair accuracy** (509 test pairs", {
        "base model, summed log-likelihood (untrained)": ci(pa["base logprob_sum"]),
        "base model, mean log-likelihood (untrained)": ci(pa["base logprob_mean"]),
        "bt probe, CV (block-23 features, wd 0, 150 steps)": ci(pa[bt]),
        "dpo probe, CV (features + log-likelihood, wd 0.1, 10,000 steps)": ci(pa[dpo]),
        "bt probe, trainer defaults (no CV)": ci(pa["bt probe (Q), trainer defaults, no CV"]),
        "dpo probe, trainer defaults (no CV)": ci(pa["dpo probe (Q), trainer defaults, no CV"]),
        "Q-Adapter, its summed reward R": ci(pa["Q-Adapter (R)"]),
        "DPO (TRL), beta log-ratio": ci(pa["DPO (beta log ratio)"]),
        "Q-Adapter seed 1": ci(pa["Q-Adapter seed 1 (R)"]),
        "DPO seed 1": ci(pa["DPO seed 1 (beta log ratio)"]),
        "judge: MiniLM Bradley-Terry (another model)": ci(pa["judge"]),
    }, cols=(2,), reports=[HH])

    def row(name, base=False):
        return (ci(gen[name]["judge"]) + ([] if base else ci(gen[name]["judge_vs_base"]))
                + ci(gen[name]["judge_vs_base_mean"]) + ci(gen[name]["offensive"])
                + n(gen[name]["tokens"], 1))

    generations = Table("docs/preferences.md", "**Generations on 200 held-out prompts**", {
        "base sample (k = 1)": row("base sample (k=1)", base=True),
        "best-of-8, bt probe (CV)": row("best-of-8, bt probe"),
        "best-of-8, dpo probe (CV)": row("best-of-8, dpo probe"),
        "best-of-8, mean log-prob (untrained)": row("best-of-8, mean log-prob"),
        "Q-Adapter sample": row("Q-Adapter sample (k=1)"),
        "DPO sample": row("DPO sample (k=1)"),
        "Q-Adapter seed 1 sample": row("Q-Adapter seed 1 sample (k=1)"),
        "DPO seed 1 sample": row("DPO seed 1 sample (k=1)"),
        "best-of-8 by the judge itself (a ceiling, not a method)": row(
            "best-of-8, the judge itself (ceiling)"),
    }, reports=[HH])
    return [readme, accuracy, generations, levels]


def demo_tables() -> list[Table]:
    t = report(DEMO)["test"]["times-tables-test"]
    p1, pk = t["pass@1"]["mean"], t["pass@k"]["8"]["mean"]

    def d(v):  # difference from pass@1, as the report prints it
        return n(v - p1)

    def probe(o, share=False):
        pr = t["probes"][o]
        g = pr["gain_over_pass@1"]
        return (ci(pr["mean_over_seeds"]) + ci(g)
                + (pct(g["mean"] / (pk - p1)) if share else []))

    rows = {
        "base pass@1": ci(t["pass@1"]),
        "greedy decoding": ci(t["greedy"]) + d(t["greedy"]["mean"]),
        "5-shot on successes (greedy)": ci(t["few_shot"]) + d(t["few_shot"]["mean"]),
        "rerank by mean token log-prob (k = 8)": ci(t["rerank_mean_logprob"])
        + ci(t["rerank_mean_logprob"]["gain"]),
        "rerank by sum token log-prob (k = 8)": ci(t["rerank_sum_logprob"])
        + ci(t["rerank_sum_logprob"]["gain"]),
        **{f"probe `{o}`": probe(o) for o in ("q", "ce", "pg")},
        "pass@8 (oracle skyline)": ci(t["pass@k"]["8"]) + d(pk),
    }
    readme = Table("README.md", "### Demo: SmolLM2-135M-Instruct on times tables", rows,
                   reports=[DEMO])
    docs = Table("docs/evaluation.md", "Test set: 40 held-out times-table problems x 8 samples", {
        "base pass@1": ci(t["pass@1"]),
        "greedy": ci(t["greedy"]) + d(t["greedy"]["mean"]),
        "5-shot on successes (greedy)": ci(t["few_shot"]) + d(t["few_shot"]["mean"]),
        **{f"probe `{o}`": probe(o, share=True) for o in ("q", "ce", "pg")},
        "pass@8 (skyline)": ci(t["pass@k"]["8"]) + d(pk) + lit("100"),
    }, reports=[DEMO])
    return [readme, docs]


def sentiment_tables() -> list[Table]:
    by = {r["label"]: r for r in report(SENTIMENT)["results"]}

    def many(labels, key, d):
        return [x for lab in labels for x in n(by[lab][key], d)]

    def heads(head):
        return [f"{head}-b{b}" for b in (2, 5, 10, 20)]

    def guided(head, work_d):
        labels = heads(head)
        return (many(labels, "positive", 3) + many(labels, "ppl_mean", 0)
                + n(by[labels[0]]["model_tokens_per_token"], work_d))

    bok = ["bok-4", "bok-8", "bok-16"]
    return [Table("docs/guided.md", "| method | positive [95% CI] | mean ppl | model work |", {
        "base sampling (top-p 1)": ci((by["base"]["positive"], *by["base"]["positive_ci"]))
        + n(by["base"]["ppl_mean"], 0) + n(by["base"]["ppl_median"], 0)
        + n(by["base"]["model_tokens_per_token"], 0),
        "base top-20": ci((by["base-top20"]["positive"], *by["base-top20"]["positive_ci"]))
        + n(by["base-top20"]["ppl_mean"], 0) + n(by["base-top20"]["model_tokens_per_token"], 0),
        "best-of-4 / 8 / 16, Q-probe": many(bok, "positive", 3)
        + n(by["bok-16"]["positive_ci"][0]) + n(by["bok-16"]["positive_ci"][1])
        + many(bok, "ppl_mean", 0) + many(bok, "model_tokens_per_token", 0),
        "ARM own state, beta 2 / 5 / 10 / 20": guided("arm-own", 0),
        "ARM distilled from RAD, own state, beta 2 / 5 / 10 / 20": guided("arm-own-distilled", 0),
        "ARM last block (separate trunk), beta 2 / 5 / 10 / 20": guided("arm-last", 1),
        "RAD last block, k = 20, beta 2 / 5 / 10 / 20 (20 prompts)": guided("rad-last", 0),
    }, reports=[SENTIMENT])]


def pal_tables() -> list[Table]:
    r = report(PAL)
    t = r["test"]["gsm8k-pal-test"]
    h = r["headline"]["objective"]
    pr = t["probes"][h]
    wv = pr["weighted_vote"]
    return [Table("README.md", "| method (k = 16; GSM8K test, first 16 questions) | reward [95% CI] |", {
        "base pass@1": ci(t["pass@1"]),
        "greedy": ci(t["greedy"]),
        "rerank by mean token log-prob": ci(t["rerank_mean_logprob"]),
        "majority vote over the 16 answers (self-consistency)": ci(t["rules"]["majority_vote"]),
        f"probe `{h}` (the objective CV on train ranks first)": ci(pr["mean_over_seeds"]),
        f"vote weighted by probe `{h}`": ci(wv),
        f"probe `{h}` minus majority vote (paired)": ci(pr["paired"]["vs_majority_vote"]),
        "weighted vote minus majority vote (paired)": ci(wv["vs_majority_vote"]),
        "pass@16 (skyline)": ci(t["pass@k"]["16"]),
    }, reports=[PAL])]


def pal_api() -> tuple[dict, dict, dict, dict]:
    """The API run's test entries and headline probes: (smollm2 test, qwen test, their probes)."""
    a, b = (report(PAL_API.format(x)) for x in ("smollm2", "qwen"))
    ta, tb = a["test"]["gsm8k-pal-test"], b["test"]["gsm8k-pal-test"]
    return ta, tb, ta["probes"][a["headline"]["objective"]], tb["probes"][b["headline"]["objective"]]


def pal_api_tables() -> list[Table]:
    ta, tb, pa, pb = pal_api()
    assert tb["pass@1"] == ta["pass@1"]  # the same completions: one column says it for both
    return [Table("docs/gsm8k-pal.md", "| row (GSM8K test, first 16) |", {
        "pass@1": ci(ta["pass@1"]),
        "greedy": ci(ta["greedy"]),
        "majority vote (ties by sample order)": ci(ta["rules"]["majority_vote"]),
        "CV-chosen probe (`q` in both)": ci(pa["mean_over_seeds"]) + ci(pb["mean_over_seeds"]),
        "CV chose": lit(pa["cv_chosen"].split("-")[0][1:], pb["cv_chosen"].split("-")[0][1:]),
        "probe minus majority vote (paired)": ci(pa["paired"]["vs_majority_vote"])
        + ci(pb["paired"]["vs_majority_vote"]),
        "vote weighted by the probe": ci(pa["weighted_vote"]) + ci(pb["weighted_vote"]),
        "pass@16": ci(ta["pass@k"]["16"]),
    }, reports=[PAL_API.format("smollm2"), PAL_API.format("qwen")])]


def all_tables() -> list[Table]:
    return (mbpp_tables() + hh_tables() + demo_tables() + sentiment_tables() + pal_tables()
            + pal_api_tables())


def _id(t: Table) -> str:
    return f"{t.doc}:{t.anchor[:40]}"


@pytest.mark.parametrize("table", all_tables(), ids=_id)
def test_every_number_of_a_results_table_is_the_reports(table: Table) -> None:
    found = {}
    for line in table.lines():
        c = cells(line)
        assert c[0] in table.rows, f"{table.doc}: row {c[0]!r} is not declared in tests/test_numbers.py"
        cols = table.cols or range(1, len(c))
        found[c[0]] = [x for i in cols for x in numbers_in(c[i])]
    missing = set(table.rows) - set(found)
    assert not missing, f"{table.doc}: declared rows not in the table: {sorted(missing)}"
    for label, want in table.rows.items():
        assert found[label] == want, (
            f"{table.doc}, row {label!r}: the doc says {found[label]}, {table.reports} say {want}")


# ------------------------------------------------------------------ sentences that quote a report


def claims() -> list[tuple[str, str, list[str]]]:
    """(doc, the exact text, the numbers in it as the report gives them)."""
    m = report(MBPP)["test"]["mbpp-test"]
    vm, vh = report(VISIBLE)["test"]["mbpp-test"], report(VISIBLE)["test"]["humaneval"]
    cvs = report(MBPP)["headline"]["cv_scores"]
    vcvs = report(VISIBLE)["headline"]["cv_scores"]
    g = report(HH)["generations"]

    def cv(s, o):
        return n(s[o]["mean"], 4)

    def head(t, o):
        g_ = t["probes"][o]["gain_over_pass@1"]["mean"]
        return pct(g_ / (t["pass@k"]["16"]["mean"] - t["pass@1"]["mean"]))

    by = {r["label"]: r for r in report(SENTIMENT)["results"]}
    arm5, bok16 = by["arm-own-b5"], by["bok-16"]
    demo = report(DEMO)
    dt = demo["test"]["times-tables-test"]
    d1, d8 = dt["pass@1"]["mean"], dt["pass@k"]["8"]["mean"]
    shares = [dt["probes"][o]["gain_over_pass@1"]["mean"] / (d8 - d1) for o in ("q", "ce", "pg")]
    vs_g = [dt["probes"][o]["paired"]["vs_greedy"]["mean"] for o in ("q", "ce", "pg")]
    vs_r = [dt["probes"][o]["paired"]["vs_rerank_mean_logprob"]["mean"] for o in ("q", "ce", "pg")]
    curve = {int(k): v for k, v in demo["curve"]["sizes"].items()}

    def mean(v):
        return sum(v) / len(v)

    old = report(RUN_1201)["test"]["mbpp-test"]["probes"]["pg"]["gain_over_pass@1"]
    api, timing = pal_api(), report(PAL_API_TIMING)
    cmp_rows = report(SENT_RUN)
    same = sum(r["compound"]["same"] and r["positive"]["same"] for r in cmp_rows)
    r_run = np.corrcoef([r["compound"]["run"] for r in cmp_rows],
                        [r["compound"]["driver"] for r in cmp_rows])[0, 1]
    return [
        ("docs/guided.md", "for all 12 policies the 95% CI of the difference",
         lit(str(same), "95")),  # "all 12": with the next claim, every policy
        ("docs/guided.md", "across the 12 policies the two sides' means correlate at Pearson r =\n0.946",
         lit(str(len(cmp_rows))) + n(r_run)),
        ("docs/evaluation.md", "gain over pass@1 on MBPP is +0.026 with a paired 95% CI of [−0.006, +0.058]",
         lit("1") + n(old["mean"]) + lit("95") + n(old["lo"]) + n(old["hi"])),
        ("README.md", "Every probe captures 65–74% of the gap between pass@1 and pass@8",
         pct(min(shares)) + pct(max(shares)) + lit("1", "8")),
        ("README.md", "every probe beats greedy\ndecoding (paired gains +0.234 to +0.275, CIs above zero)",
         n(min(vs_g)) + n(max(vs_g))),
        ("README.md", "already captures 58%: the probes\nbeat it by +0.034 to +0.075",
         pct(dt["rerank_mean_logprob"]["gain"]["mean"] / (d8 - d1)) + n(min(vs_r)) + n(max(vs_r))),
        ("docs/evaluation.md", "Learning curve (`pg`, 10 random prompt\nsubsets per size): 10 prompts 0.628 (0.557-0.709), 20: 0.645, 40: 0.681, 81: 0.700.",
         lit("10", "10") + n(mean(curve[10])) + n(min(curve[10])) + n(max(curve[10]))
         + [x for size in (20, 40, 81) for x in lit(str(size)) + n(mean(curve[size]))]),
        ("README.md", "0.71 positive at perplexity 43 (beta 5) where best-of-16 with a Q-probe reaches 0.59 at 258",
         n(arm5["positive"], 2) + n(arm5["ppl_mean"], 0) + lit("5", "16") + n(bok16["positive"], 2)
         + n(bok16["ppl_mean"], 0)),
        ("docs/guided.md", "ARM on the own state at beta 5 (0.713 [0.662, 0.758], ppl 43)\nbeats best-of-16 (0.594, ppl 258)",
         lit("5") + ci((arm5["positive"], *arm5["positive_ci"])) + n(arm5["ppl_mean"], 0) + lit("16")
         + n(bok16["positive"]) + n(bok16["ppl_mean"], 0)),
        ("docs/evaluation.md", "(`pg`) at\n  0.328 (14% of the headroom), level with greedy (−0.032, CI across zero)",
         n(m["probes"]["pg"]["mean_over_seeds"]["mean"]) + head(m, "pg")
         + n(m["probes"]["pg"]["paired"]["vs_greedy"]["mean"])),
        ("docs/evaluation.md", "`ce` did best on test (0.370, 25%, +0.010 vs greedy",
         n(m["probes"]["ce"]["mean_over_seeds"]["mean"]) + head(m, "ce")
         + n(m["probes"]["ce"]["paired"]["vs_greedy"]["mean"])),
        ("README.md", "selection reward 0.3858, against `ce` 0.3849 and `q` 0.3793; with the shown test 0.5820, against\n0.5777 and 0.5755)",
         cv(cvs, "pg") + cv(cvs, "ce") + cv(cvs, "q") + cv(vcvs, "pg") + cv(vcvs, "q") + cv(vcvs, "ce")),
        ("README.md", "is level with greedy on MBPP (−0.032, paired CI [−0.093, +0.032]) at\n14% of the headroom",
         ci(m["probes"]["pg"]["paired"]["vs_greedy"]) + head(m, "pg")),
        ("README.md", "(0.370, +0.010 [−0.049, +0.065] vs\ngreedy)",
         n(m["probes"]["ce"]["mean_over_seeds"]["mean"]) + ci(m["probes"]["ce"]["paired"]["vs_greedy"])),
        ("README.md", "beats greedy by +0.187 [+0.120, +0.255] on MBPP and +0.213 [+0.146, +0.280] on HumanEval",
         ci(vm["probes"]["pg"]["paired"]["vs_greedy"]) + ci(vh["probes"]["pg"]["paired"]["vs_greedy"])),
        ("docs/evaluation.md", "`pg` 0.3858 ± 0.0129,\n  `ce` 0.3849 ± 0.0072, `q` 0.3793 ± 0.0165 (with the shown tests: `pg` 0.5820, `q` 0.5777,\n  `ce` 0.5755)",
         [x for o in ("pg", "ce", "q") for x in cv(cvs, o) + n(cvs[o]["se"], 4)]
         + cv(vcvs, "pg") + cv(vcvs, "q") + cv(vcvs, "ce")),
        ("README.md", "GGUF on loopback (27.9 tokens/s), features from a local model. Majority vote 0.250; the\n"
         "CV-chosen probe on SmolLM2 features 0.250 (minus the vote +0.000 [−0.188, +0.188]), on Qwen's\n"
         "own features 0.188 (−0.062 [−0.312, +0.125])",
         n(timing["server"]["tokens_per_s"], 1) + n(api[0]["rules"]["majority_vote"]["mean"])
         + lit("2") + n(api[2]["mean_over_seeds"]["mean"]) + ci(api[2]["paired"]["vs_majority_vote"])
         + n(api[3]["mean_over_seeds"]["mean"]) + ci(api[3]["paired"]["vs_majority_vote"])),
        ("docs/preferences.md", "the Q-Adapter is below plain sampling (-0.028\n[-0.047, -0.010], seed 1 -0.024 [-0.044, -0.004])",
         ci(g["Q-Adapter sample (k=1)"]["judge_vs_base_mean"]) + lit("1")
         + ci(g["Q-Adapter seed 1 sample (k=1)"]["judge_vs_base_mean"])),
    ]


@pytest.mark.parametrize("claim", claims(), ids=lambda c: f"{c[0]}:{c[1][:30]}")
def test_every_quoted_sentence_is_the_reports(claim: tuple[str, str, list[str]]) -> None:
    path, text, want = claim
    assert text in doc(path), f"{path}: the sentence {text!r} is gone or changed"
    assert numbers_in(text) == want, f"{path}: {text!r} says {numbers_in(text)}, the report {want}"


def test_the_headline_is_the_objective_cv_ranks_first() -> None:
    """The report's headline is the best CV score on train, and the docs call that one chosen."""
    for path in (MBPP, VISIBLE, PAL):
        r = report(path)
        scores = r["headline"]["cv_scores"]
        assert r["headline"]["objective"] == max(scores, key=lambda o: scores[o]["mean"])
        for t in r["test"].values():
            assert {o: p["cv_score"] for o, p in t["probes"].items()} == scores
    for path in ("README.md", "docs/evaluation.md"):
        chosen = [line for line in doc(path).splitlines()
                  if line.startswith("|") and "chosen on train" in cells(line)[0]]
        assert chosen and all(f"`{report(MBPP)['headline']['objective']}`" in line
                              for line in chosen), chosen
