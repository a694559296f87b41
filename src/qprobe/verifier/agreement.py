"""MBR-exec agreement and CodeT scores from stored execution results: pure numpy, no execution.

MBR-exec (Shi et al., 2022): candidates that produce the same outputs on the same inputs agree;
a candidate's cluster size is how many of its prompt's candidates share its signature (itself
included). A candidate whose program did not run to the end (signature starting with "!"), or
whose every input raised, agrees with nobody: size 0.

CodeT (Chen et al., 2022, arXiv 2207.10397): candidates are grouped by the exact set of
model-written tests they pass; each candidate's score is (candidates in its group) x (tests the
group passes), so a big group passing many tests wins.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np

FAILED = "!"  # prefix of a signature whose program did not finish (syntax error, crash, timeout)


def failed(sig: str) -> bool:
    """A signature that shows no behaviour: the program did not finish ("!syntax_error", ...)
    or every input raised (a JSON list of "!ExceptionName" only)."""
    if sig.startswith(FAILED):
        return True
    try:
        outs = json.loads(sig)
    except ValueError:
        return False
    return bool(outs) and all(isinstance(o, str) and o.startswith(FAILED) for o in outs)


def cluster_sizes(signatures: Sequence[str]) -> np.ndarray:
    """[k] int: for each candidate, how many of the k share its signature (0 for a failed one)."""
    bad = [failed(s) for s in signatures]
    counts = Counter(s for s, b in zip(signatures, bad) if not b)
    return np.array([0 if b else counts[s] for s, b in zip(signatures, bad)], dtype=np.int64)


def codet_scores(passed: Sequence[Sequence[int]]) -> np.ndarray:
    """[k] int: CodeT score of each candidate from the indices of the generated tests it passes:
    (candidates passing exactly the same set) x (size of that set)."""
    keys = [frozenset(int(t) for t in p) for p in passed]
    counts = Counter(keys)
    return np.array([counts[key] * len(key) for key in keys], dtype=np.int64)


def per_prompt(group: np.ndarray, values: Sequence, fn) -> np.ndarray:
    """Apply `fn` (a list of one prompt's values -> [k] array) to each prompt's rows; [N] float64
    in row order. `group` [N] int prompt index."""
    out = np.zeros(len(group), dtype=np.float64)
    group = np.asarray(group)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for ix in np.split(order, bounds):
        if len(ix):
            out[ix] = fn([values[i] for i in ix])
    return out


def _of_max(values: list) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a / a.max() if a.max() > 0 else np.zeros(len(a))


def normalise_max(scores: np.ndarray, group: np.ndarray) -> np.ndarray:
    """scores / the prompt's largest score ([N], 0 where a prompt's largest is 0)."""
    return per_prompt(group, scores, _of_max)


# error classes of the shown test (`visible_status`) and the one-hot probe extras made from them
VISIBLE_STATUSES = ("pass", "wrong_answer", "exception", "syntax_error", "timeout", "none")
VISIBLE_ONE_HOT = {"visible_wrong": ("wrong_answer",), "visible_error": ("exception", "timeout"),
                   "visible_syntax": ("syntax_error",)}


def exec_extras(columns: dict[str, list], group: np.ndarray) -> dict[str, np.ndarray]:
    """The probe extras made from the execution columns a folder has, each [N] float64; a column
    with a row not yet computed (null) gives no extra, so a half-filled folder is never read.

    visible_wrong / visible_error / visible_syntax: one-hot error class of the shown test (all 0
    on a pass or where no test is shown); mbr_share / mbr_size: the MBR-exec cluster on the
    shown test's inputs (mbr_gen_share: on the model-written tests' inputs); gen_pass / gen_pass_frac / codet_score: model-written tests passed, the
    fraction of the prompt's tests, and the CodeT score / the prompt's best."""
    out: dict[str, np.ndarray] = {}
    vs = columns.get("visible_status")
    if vs is not None and None not in vs:
        for name, classes in VISIBLE_ONE_HOT.items():
            out[name] = np.array([1.0 if s in classes else 0.0 for s in vs])
    # MBR-exec clusters: (signature column, extra for its size or None, extra for its share)
    for col, size_name, share_name in (("exec_sig", "mbr_size", "mbr_share"),
                                       ("gen_sig", None, "mbr_gen_share"),
                                       ("fuzz_sig", "mbr_fuzz_size", "mbr_fuzz_share")):
        sig = columns.get(col)
        if sig is None or None in sig:
            continue
        size = per_prompt(group, sig, cluster_sizes)
        k = per_prompt(group, sig, lambda v: np.full(len(v), len(v)))
        if size_name:
            out[size_name] = size
        out[share_name] = size / np.maximum(k, 1)
    passed, n = columns.get("gen_passed"), columns.get("gen_tests")
    if passed is not None and n is not None and None not in passed and None not in n:
        cnt = np.array([len(p) for p in passed], dtype=np.float64)
        nt = np.asarray(n, dtype=np.float64)
        out["gen_pass"] = cnt
        out["gen_pass_frac"] = np.where(nt > 0, cnt / np.maximum(nt, 1), 0.5)
        out["codet_score"] = normalise_max(per_prompt(group, passed, codet_scores), group)
    return out


EXEC_EXTRAS = (*VISIBLE_ONE_HOT, "mbr_share", "mbr_size", "mbr_gen_share", "gen_pass",
               "gen_pass_frac", "codet_score", "mbr_fuzz_share", "mbr_fuzz_size")
# = probe.EXEC_EXTRAS (a test checks)
EXEC_COLUMNS = ("visible_status", "exec_sig", "gen_passed", "gen_tests", "gen_sig", "fuzz_sig")


def _vote_weights(values: list) -> np.ndarray:
    """One prompt's [(signature, score)] -> [k] total weight of each candidate's signature,
    weight exp(z) with z the score standardised over the prompt (0 for a failed candidate)."""
    sig = [s for s, _ in values]
    q = np.array([q for _, q in values], dtype=np.float64)
    sd = q.std()
    w = np.exp((q - q.mean()) / sd) if sd > 0 else np.ones(len(q))
    bad = [failed(s) for s in sig]
    total: dict[str, float] = {}
    for s, b, x in zip(sig, bad, w):
        if not b:
            total[s] = total.get(s, 0.0) + float(x)
    return np.array([0.0 if b else total[s] for s, b in zip(sig, bad)])


def weighted_vote(group: np.ndarray, signatures: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """[N] scores whose per-prompt argmax is the vote weighted by a probe: each candidate's
    signature (answer) gets the sum of exp(z) over the candidates that share it, z = probe score
    standardised within the prompt (so no scale or temperature to choose, and equal scores give
    the plain majority vote); a failed candidate weighs 0. Ties go to the higher own score."""
    from qprobe.verifier.baselines import lexicographic

    q = np.asarray(scores, dtype=np.float64)
    w = per_prompt(group, list(zip(signatures, q.tolist())), _vote_weights)
    return lexicographic([w, q])
