"""Zero-parameter selection rules built from the free signals, as score arrays for evaluate.py.

Each rule orders a prompt's candidates lexicographically by its signals and breaks the last tie
by mean token log-probability (as the shown-test filter of experiment/run.py does); the argmax
is the candidate chosen. Scores are global ranks, so `evaluate.argmax_expected_reward` and
`evaluate_groups` take them as they are. Nothing is fitted: these are the baselines a learned
probe must beat (docs/verifier-execution.md).
"""

from __future__ import annotations

import numpy as np

# ordinal of the shown test's error class: a wrong answer is closer to right than a crash
STATUS_ORDER = {"pass": 3.0, "none": 2.0, "wrong_answer": 1.0, "exception": 0.0, "timeout": 0.0,
                "syntax_error": -1.0}

# rule name -> the signals it sorts by, most important first (logprob_mean always breaks ties)
RULES = {
    "rerank_mean_logprob": (),
    "shown_test_filter": ("visible_pass",),
    "shown_test_error_class": ("visible_ordinal",),
    "mbr_exec": ("mbr_size",),
    "filter_then_mbr_exec": ("visible_pass", "mbr_size"),
    "mbr_exec_nearby_inputs": ("mbr_fuzz_size",),
    "filter_then_mbr_nearby": ("visible_pass", "mbr_fuzz_size"),
    "codet": ("codet_score",),
    "filter_then_codet": ("visible_pass", "codet_score"),
    "mbr_exec_generated_inputs": ("mbr_gen_share",),
    "generated_tests_passed": ("gen_pass",),
    # Coder-Reviewer (`qprobe review`): log p(program | instruction) + log p(instruction | program)
    "coder_reviewer": ("coder_reviewer",),
    "filter_then_coder_reviewer": ("visible_pass", "coder_reviewer"),
}


def lexicographic(keys: list[np.ndarray]) -> np.ndarray:
    """[N] float scores whose order is lexicographic in `keys` (first most important): the global
    rank, equal keys sharing a rank (then the lowest sample index wins, as everywhere)."""
    arr = np.stack([np.asarray(k, dtype=np.float64) for k in keys], axis=1)  # [N, K]
    _, rank = np.unique(arr, axis=0, return_inverse=True)  # sorted lexicographically by column
    return rank.reshape(-1).astype(np.float64)


def visible_ordinal(status: list[str | None]) -> np.ndarray:
    """[N] STATUS_ORDER of each `visible_status` (null: as 'none')."""
    return np.array([STATUS_ORDER[s or "none"] for s in status], dtype=np.float64)


def rule_scores(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores [N] of every rule whose signals `cols` has (Rollouts.extra_inputs(), plus
    `visible_ordinal`); `logprob_mean` is required (the tie-break)."""
    out = {}
    for name, signals in RULES.items():
        if all(s in cols for s in signals):
            out[name] = lexicographic([cols[s] for s in signals] + [cols["logprob_mean"]])
    return out
