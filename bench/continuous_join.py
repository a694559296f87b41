"""What does arriving apart cost an open decode? The same 8 prompts (k = 4, 16 tokens, the tiny
random model of the tests, one process, no HTTP), side by side in one run:

  in turn:   8 `sample` calls, one after another;
  together:  one open decode (`decode_continuous`) that admits all 8 before its first step;
  staggered: one open decode that admits one more prompt before each of its first 8 steps
             (requests arriving over several decode steps, as HTTP clients do);
  closed:    one `sample` call over the 8 prompts.

Each is timed over `--reps` repetitions; the ratios to "in turn" are printed. It explains
bench/serve_speed.py's (b) on the tiny model (docs/serve.md).

    python bench/continuous_join.py [--reps 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qprobe.backends import SamplingParams, load_model  # noqa: E402
from serve_speed import PROMPTS, tiny_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(str(tiny_model(Path(tempfile.mkdtemp(prefix="qprobe-join-")) / "tiny")))
    params = SamplingParams(max_new_tokens=16, seed=1)
    eight = PROMPTS[8:16]

    def in_turn() -> None:
        for p in eight:
            model.sample([p], 4, params)

    def open_decode(stagger: bool) -> int:
        calls = [0]

        def admit():
            c = calls[0]
            calls[0] += 1
            if stagger:
                return [(eight[c], 1, c)] if c < len(eight) else []
            return [(p, 1, i) for i, p in enumerate(eight)] if c == 0 else []

        return model.decode_continuous(4, params, admit, lambda tag, s: None)["steps"]

    runs = {"in turn": in_turn, "together": lambda: open_decode(False),
            "staggered": lambda: open_decode(True), "closed": lambda: model.sample(eight, 4, params)}
    for f in runs.values():  # warm up
        f()
    ms = {}
    for name, f in runs.items():
        t0 = time.perf_counter()
        for _ in range(a.reps):
            f()
        ms[name] = (time.perf_counter() - t0) / a.reps * 1e3
    steps = {"together": open_decode(False), "staggered": open_decode(True)}
    for name, t in ms.items():
        extra = f", {steps[name]} decode steps" if name in steps else ""
        print(f"{name:10s} {t:7.1f} ms  ({ms['in turn'] / t:.2f}x of in turn{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
