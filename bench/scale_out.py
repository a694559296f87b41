"""Does spreading a collection over Ray actors cost throughput? Side by side, in one run.

The same collection (embedded SmolLM2-135M-Instruct, MBPP test prompts as plain prompts, k
samples of `--new-tokens` tokens, `--batch-prompts` prompts per batch), run as two `qprobe
collect` commands, each in its own process:

  local  the local collector with `--threads` torch threads (one process, one model)
  ray    `--executor ray --workers W --threads-per-worker 1` on a Ray started by the command
         on this machine (W actors, one model each)

For each: tokens/s over the sampling (the command's summary: from the first batch to the end,
model loading excluded), the whole command's wall time, and the time from the command's start to
its first committed shard (polled here). Then the two folders are compared key by key: how many
completions differ (float rounding of other thread counts can flip a token; the seeds are per
(prompt, sample)).

    python bench/scale_out.py                     # 16 prompts x k 8 x 64 tokens, 2 vs 2 x 1
    python bench/scale_out.py --prompts 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def write_prompts(path: Path, n: int) -> None:
    """MBPP test prompts (text + first test) as a plain {id, prompt} file; synthetic without it."""
    if MBPP.is_file():
        rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if 11 <= int(r["task_id"]) <= 510][:n]
        prompts = [f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}"
                   for r in rows]
    else:
        prompts = [f"Write a Python function that returns the {i}th square number." for i in range(n)]
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")


def run(name: str, args: list[str], out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **RAY_ENV)
    cmd = [sys.executable, "-m", "qprobe", "collect", *args, "--out", str(out), "--no-progress"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and any(out.glob("samples-*.parquet")):
            first = time.time() - t0
        time.sleep(0.05)
    wall = time.time() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{name}: qprobe collect failed:\n{stderr[-3000:]}")
    s = json.loads(stdout.strip().splitlines()[-1])
    return {"name": name, "tok_s": s["tokens_per_s"], "sampling_s": s["seconds"], "wall_s": wall,
            "first_shard_s": first, "rows": s["rows"]}


def differing(a: Path, b: Path) -> tuple[int, int]:
    from qprobe.rollouts import Rollouts

    def table(p: Path) -> dict:
        r = Rollouts(p)
        return dict(zip(zip(r.prompt_ids.tolist(), r.sample_idx.tolist()), r.column("completion")))

    ta, tb = table(a), table(b)
    assert ta.keys() == tb.keys(), "the two runs stored different keys"
    return sum(ta[k] != tb[k] for k in ta), len(ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-prompts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="local torch threads = Ray actors")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        tmp_path = Path(tmp)
        write_prompts(tmp_path / "prompts.jsonl", a.prompts)
        common = ["--task", str(tmp_path / "prompts.jsonl"), "--k", str(a.k),
                  "--max-new-tokens", str(a.new_tokens), "--batch-prompts", str(a.batch_prompts)]
        local = run("local", common, tmp_path / "local", a.threads)
        ray = run("ray", [*common, "--executor", "ray", "--workers", str(a.threads),
                          "--threads-per-worker", "1"], tmp_path / "ray", 1)
        n_diff, n = differing(tmp_path / "local", tmp_path / "ray")
    print(f"SmolLM2-135M, {a.prompts} prompts x k={a.k} x {a.new_tokens} tokens, "
          f"{a.batch_prompts} prompts per batch, {os.cpu_count()} cores")
    print(f"{'executor':<34} {'tok/s':>7} {'sampling s':>10} {'wall s':>7} {'1st shard s':>11}")
    for r, label in ((local, f"local, {a.threads} threads"),
                     (ray, f"ray, {a.threads} actors x 1 thread")):
        print(f"{label:<34} {r['tok_s']:>7.1f} {r['sampling_s']:>10.1f} {r['wall_s']:>7.1f} "
              f"{r['first_shard_s'] or float('nan'):>11.1f}")
    print(f"ray / local tokens/s: {ray['tok_s'] / local['tok_s']:.3f} "
          f"(overhead {100 * (1 - ray['tok_s'] / local['tok_s']):+.1f}%); "
          f"wall ratio {ray['wall_s'] / local['wall_s']:.2f}")
    print(f"completions that differ between the two runs: {n_diff} of {n}")


if __name__ == "__main__":
    main()
