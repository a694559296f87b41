"""How far any weighting of the free signals can get inside the shown-test filter (issue 24).

The shown-test filter keeps the candidates that pass the test the prompt shows and picks by mean
log-prob. A learned verifier can only beat it by ordering those passing candidates better. This
script asks whether the stored free signals carry that order at all:

1. more per-candidate features derived from the stored execution results (not probe inputs yet):
   soft agreement (per nearby input, the share of candidates with the same output, averaged),
   the same among passing candidates only, MBR cluster size among passing candidates, the share
   of nearby inputs that raise, completion length, and whether the shown test's expected value is
   written into the code (hard-coding); their within-prompt AUC among the passing candidates;
2. every weighting on a grid of the z-scored signals (per prompt) as the order inside the filter:
   the weighting best on train, and - the ceiling - the weighting best on each test set itself
   (chosen on test: an upper bound no honest method can exceed with these signals); where the
   reviewer likelihood is stored for every candidate, also with it.

    PYTHONPATH=src python bench/verifier_ceiling.py results/mbpp-qwen-coder/rollouts \
        --sets train mbpp-test humaneval --out results/mbpp-qwen-coder-verifier/ceiling.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import numpy as np

from qprobe.evaluate import concordance
from qprobe.fileio import atomic_write_text
from qprobe.rollouts import Rollouts
from qprobe.verifier.agreement import FAILED

DERIVED = ("soft_agree", "soft_agree_passing", "mbr_passing", "nearby_error_share",
           "num_tokens", "hard_coded")
WEIGHTED = ("logprob_mean", "mbr_fuzz_share", "soft_agree", "mbr_share")
REVIEWER = ("coder_reviewer", "reviewer_mean")
GRID = (-1.0, -0.3, 0.0, 0.3, 1.0)
ASSERT_RHS = re.compile(r"assert .*==\s*(.+)")


def _outputs(sig: str | None) -> list[str]:
    """The per-input outputs of a fuzz signature ('!syntax_error' -> one failed output)."""
    if not sig:
        return []
    return json.loads(sig) if sig.startswith("[") else [sig]


def derived(prompt: str, completions: list[str], sigs: list[str | None], passing: np.ndarray,
            tokens: np.ndarray) -> dict[str, np.ndarray]:
    """[k] features of one prompt's candidates from their nearby-input outputs."""
    k = len(sigs)
    outs = [_outputs(s) for s in sigs]
    n = max((len(o) for o in outs), default=0)
    table = np.array([[o[j] if j < len(o) else FAILED for j in range(n)] for o in outs],
                     dtype=object).reshape(k, n)  # [k, n] output of candidate i on input j
    bad = np.vectorize(lambda s: s.startswith(FAILED), otypes=[bool])(table) if n else \
        np.ones((k, 0), bool)
    same = (table[:, None, :] == table[None, :, :]) & ~bad[None, :, :]  # [k, k, n]
    soft = same.mean(axis=1).mean(axis=1) if n else np.zeros(k)
    soft_p = (same[:, passing, :].mean(axis=1).mean(axis=1) if n and passing.any()
              else np.zeros(k))
    keys = ["\x00".join(row) for row in table]
    ok = ~bad.any(axis=1) if n else np.zeros(k, bool)
    mbr_p = np.array([sum(1 for j in np.flatnonzero(passing) if keys[j] == keys[i]) if ok[i]
                      else 0 for i in range(k)], dtype=np.float64)
    m = ASSERT_RHS.search(prompt)
    lit = m.group(1).strip() if m else ""
    hard = np.array([float(len(lit) > 1 and lit in c) for c in completions])
    return {"soft_agree": soft, "soft_agree_passing": soft_p, "mbr_passing": mbr_p,
            "nearby_error_share": bad.mean(axis=1) if n else np.ones(k),
            "num_tokens": tokens.astype(np.float64), "hard_coded": hard}


def load(path: Path) -> tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Row indices per prompt, rewards [N], and every stored and derived signal [N]."""
    r = Rollouts(path)
    group, _ = r.groups()
    x = dict(r.extra_inputs())
    rewards = r.rewards
    prompts, comps = r.column("prompt"), r.column("completion")
    sigs, toks = r.column("fuzz_sig"), np.asarray(r.column("num_tokens"))
    vis = x["visible_pass"] == 1
    rows = [np.flatnonzero(group == g) for g in range(int(group.max()) + 1)]
    for name in DERIVED:
        x[name] = np.zeros(len(rewards))
    for ix in rows:
        d = derived(prompts[ix[0]], [comps[i] for i in ix], [sigs[i] for i in ix], vis[ix],
                    toks[ix])
        for name, v in d.items():
            x[name][ix] = v
    return rows, rewards, x


def inside_filter_auc(rows, rewards, x, name: str) -> tuple[float | None, int]:
    """Mean within-prompt AUC of one signal among passing candidates, over the prompts whose
    passing candidates differ in reward; and how many prompts that is."""
    vis = x["visible_pass"] == 1
    cs = []
    for ix in rows:
        p = ix[vis[ix]]
        if len(p) > 1:
            c = concordance(x[name][p], rewards[p])
            if c is not None:
                cs.append(c)
    return (float(np.mean(cs)) if cs else None), len(cs)


def picks(rows, rewards, x, names: tuple[str, ...], grid: list[tuple[float, ...]]) -> np.ndarray:
    """[W] mean reward of the candidate chosen per prompt under each weighting: passing first,
    then sum_s w_s * z(signal s), z-scored within the prompt (every prompt has k candidates)."""
    ix = np.stack(rows)  # [P, k]
    z = np.stack([x[n][ix] for n in names], -1).astype(np.float64)  # [P, k, S]
    z = (z - z.mean(1, keepdims=True)) / (z.std(1, keepdims=True) + 1e-9)
    s = z @ np.asarray(grid, dtype=np.float64).T  # [P, k, W]
    s += 1e3 * (x["visible_pass"][ix] == 1)[:, :, None]
    chosen = s.argmax(1)  # [P, W]
    return np.nanmean(rewards[np.take_along_axis(ix, chosen, 1)], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="folder holding the rollouts folders")
    ap.add_argument("--sets", nargs="+", required=True, help="the first is the train set")
    ap.add_argument("--out", type=Path, help="write the markdown here as well")
    a = ap.parse_args()
    data = {s: load(a.root / s) for s in a.sets}
    lines = ["# Inside the shown-test filter: what the free signals can reach (issue 24)", "",
             "Reproduce:", "", "    PYTHONPATH=src python bench/verifier_ceiling.py "
             f"{a.root} --sets {' '.join(a.sets)}" + (f" --out {a.out}" if a.out else ""), "",
             "## Within-prompt AUC among the candidates that pass the shown test", "",
             "| signal | " + " | ".join(a.sets) + " |", "|---|" + "---|" * len(a.sets)]
    for name in ("logprob_mean", "mbr_fuzz_share", "mbr_share", *DERIVED):
        cells = []
        for s in a.sets:
            auc, n = inside_filter_auc(*data[s], name)
            cells.append("-" if auc is None else f"{auc:.3f} ({n})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    grid = [w for w in itertools.product(GRID, repeat=len(WEIGHTED)) if any(w)]
    got = [picks(*data[s], WEIGHTED, grid) for s in a.sets]  # per set [W]
    table = {w: [float(g[i]) for g in got] for i, w in enumerate(grid)}
    filt = (1.0, 0.0, 0.0, 0.0)
    lines += ["", f"## Order inside the filter: weights on z-scored ({', '.join(WEIGHTED)}), "
              f"grid {list(GRID)} each ({len(grid)} weightings)", "",
              "| weighting | chosen on | " + " | ".join(a.sets) + " |",
              "|---|---|" + "---|" * len(a.sets),
              f"| {filt} (the shown-test filter) | - | "
              + " | ".join(f"{v:.3f}" for v in table[filt]) + " |"]
    for j, s in enumerate(a.sets):
        best = max(grid, key=lambda w: (table[w][j], w == filt))
        lines.append(f"| {best} | {s}{' (train)' if j == 0 else ' (test: upper bound)'} | "
                     + " | ".join(f"{v:.3f}" for v in table[best]) + " |")
    with_rev = [s for s in a.sets if all(n in data[s][2] for n in REVIEWER)]
    if with_rev:
        names = (*WEIGHTED, *REVIEWER)
        grid_r = [w for w in itertools.product(GRID, repeat=len(names)) if any(w)]
        lines += ["", f"With the reviewer likelihood too (`{'`, `'.join(REVIEWER)}`; only where "
                  f"`qprobe review` scored every candidate): {len(grid_r)} weightings of "
                  f"({', '.join(names)}), the best chosen on the set itself (an upper bound)", "",
                  "| set | the shown-test filter | best weighting | its reward |", "|---|---|---|---|"]
        for s in with_rev:
            g = picks(*data[s], names, grid_r)
            best = int(np.argmax(g))
            lines.append(f"| {s} | {table[filt][a.sets.index(s)]:.3f} | {grid_r[best]} | "
                         f"{g[best]:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        atomic_write_text(a.out, text)


if __name__ == "__main__":
    main()
