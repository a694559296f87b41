"""What does `qprobe serve` cost and what does its batching buy? Side by side, in one run.

A real `qprobe serve` subprocess on loopback serves the model with a probe (random weights on
the model's features: the probe's quality does not change the speed); this process holds the
same model for the library calls and drives the server with the `openai` client.

  (a) latency the server adds: `best_of_k` called directly vs the same request (same prompt,
      seed, k, tokens: the same decode work) through the server, interleaved one after the
      other; p50 and p99 of the per-pair difference (goal: <= 5 ms at p50), and the p50 ratio
      server / library (goal: a lone request within 5% of the library call). On a busy machine
      the model's time varies by more than that from call to call, so the server's own part is
      also given: the client's round trip minus the server's time in `sample` + scoring (the
      library's work, timed inside the server): HTTP, JSON, queueing and thread handoffs.
  (b) 8 different prompts (8 seeds) as 8 concurrent clients vs the same 8 requests one at a
      time, side by side in each of `--rounds` rounds, the median round reported (goals: >= 4x
      on the tiny model, >= 2.5x on SmolLM2): concurrent requests share one
      open decode (continuous batching), joining it at the next step; decode steps thrown away
      are 0 by construction (nothing restarts), the requests that joined a running decode are
      counted.
  (c) a load run: `--load-requests` requests (>= 500) from 16 concurrent clients; errors
      counted, the server's RSS sampled at start, during and at the end.
  (d) a guided policy (an ARM head with random weights on the model's own feature state),
      `--guided-tokens` (64) tokens, streamed, end-of-sequence ignored (`ignore_eos`, so every
      answer has the goal's length): time to the first content chunk against the whole
      answer's time (goal: TTFT <= 10%).

    python bench/serve_speed.py                       # the embedded SmolLM2-135M
    python bench/serve_speed.py --model PATH          # any local model qprobe loads
    python bench/serve_speed.py --tiny                # a tiny random model (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = [f"Write one short sentence about the number {i}." for i in range(64)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_lm import save_tiny

    return save_tiny(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model qprobe loads (default: SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    ap.add_argument("--k", type=int, default=4, help="candidates per request")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per candidate")
    ap.add_argument("--latency-pairs", type=int, default=40, help="(a): library/server pairs")
    ap.add_argument("--clients", type=int, default=8, help="(b): concurrent clients")
    ap.add_argument("--rounds", type=int, default=5, help="(b): rounds (the median is reported)")
    ap.add_argument("--load-requests", type=int, default=500, help="(c): requests")
    ap.add_argument("--load-clients", type=int, default=16, help="(c): concurrent clients")
    ap.add_argument("--guided-tokens", type=int, default=64, help="(d): tokens per answer")
    ap.add_argument("--guided-requests", type=int, default=5, help="(d): streamed requests")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each process (0: torch's default)")
    a = ap.parse_args()

    import openai
    import torch

    from qprobe.backends import SamplingParams, load_model
    from qprobe.policy import best_of_k
    from qprobe.probe import Probe

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="qprobe-serve-bench-"))
    model_arg = str(tiny_model(work / "tiny")) if a.tiny else a.model
    model = load_model(model_arg)
    spec = model.feature_spec
    probe = Probe(spec.dim, beta=0.0, objective="q", feature_spec=spec)
    with torch.no_grad():
        probe.net[-1].weight.normal_(generator=torch.Generator().manual_seed(0))
    probe_dir = probe.save(work / "probe")
    from qprobe.policy.heads import RewardHead, tokenizer_identity

    torch.manual_seed(0)
    head = RewardHead("arm", spec.dim, rank=16, feature_spec=spec,
                      tokenizer=tokenizer_identity(model.tok.tokenizer))
    with torch.no_grad():
        for prm in head.parameters():
            prm.normal_(std=0.1)
    head_dir = head.save(work / "head")
    port = free_port()
    env = {**os.environ}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed at the end
    proc = subprocess.Popen(
        [sys.executable, "-m", "qprobe", "serve", "--model", model_arg, "--probe",
         f"p={probe_dir}", "--port", str(port), "--name", "m", "--k", str(a.k),
         "--max-tokens", str(a.max_tokens), "--log-level", "warning",
         "--threads", str(a.threads), "--policy",
         f"g=guided:head={head_dir},beta=2,top_k=20"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 900  # a model load on a crowded machine can take minutes
    while True:
        try:
            with opener.open(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                print("qprobe serve did not start:\n" + (work / "serve.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def joined() -> int:
        """Requests that joined a running decode so far (the server's /health)."""
        with opener.open(url + "/health", timeout=10) as r:
            return int(json.loads(r.read()).get("joined", 0))

    def served(prompt: str, seed: int | None = 0):
        return client.completions.create(model="m:p", prompt=prompt, seed=seed,
                                         max_tokens=a.max_tokens, extra_body={"k": a.k})

    def library(prompt: str, seed: int = 0):
        p = SamplingParams(max_new_tokens=a.max_tokens, seed=seed)
        return best_of_k(model, probe, prompt, k=a.k, beta=0.0, params=p, seed=seed)

    try:
        rss0 = rss_mb(proc.pid)
        served(PROMPTS[0])  # warm both sides
        library(PROMPTS[0])
        print(f"model {model.name} (feature layer {spec.layer}), k={a.k}, "
              f"{a.max_tokens} tokens per candidate, torch threads {torch.get_num_threads()}")

        # (a) added latency: same request both ways, interleaved, order alternating
        lib_t, srv_t, same, queue_ms, batch_ms = [], [], 0, [], []
        for i in range(a.latency_pairs):
            prompt = PROMPTS[i % 8]
            for first in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                if first == 0:
                    c = library(prompt, seed=i)
                    lib_t.append(time.perf_counter() - t0)
                else:
                    r = served(prompt, seed=i)
                    srv_t.append(time.perf_counter() - t0)
            same += int(r.choices[0].text == c.text)
            queue_ms.append(r.model_extra["qprobe"]["queue_ms"])
            batch_ms.append(r.model_extra["qprobe"]["batch_ms"])
        diff = [(s - x) * 1e3 for s, x in zip(srv_t, lib_t)]
        around = [s * 1e3 - b for s, b in zip(srv_t, batch_ms)]  # HTTP, JSON, queue, handoffs
        print(f"(a) library p50 {pct(lib_t, 50) * 1e3:.1f} ms, through the server p50 "
              f"{pct(srv_t, 50) * 1e3:.1f} ms (ratio {pct(srv_t, 50) / pct(lib_t, 50):.3f}, "
              f"goal <= 1.05); added per pair: p50 {pct(diff, 50):.2f} ms, "
              f"p99 {pct(diff, 99):.2f} ms (goal p50 <= 5 ms); same answer {same}/"
              f"{a.latency_pairs}; in the server: queue p50 {pct(queue_ms, 50):.2f} ms, "
              f"sample+score p50 {pct(batch_ms, 50):.1f} ms")
        print(f"    round trip minus the server's sample+score (the library's work): p50 "
              f"{pct(around, 50):.2f} ms, p99 {pct(around, 99):.2f} ms; slowest call: library "
              f"{max(lib_t):.1f} s, server {max(srv_t):.1f} s (sample+score "
              f"{max(batch_ms) / 1e3:.1f} s)")

        # (b) 8 concurrent clients vs the same 8 requests one at a time, side by side in each
        # round; the median round is the result (every round printed)
        eight = PROMPTS[8 : 8 + a.clients]
        rounds = []
        for rnd in range(a.rounds):
            t0 = time.perf_counter()
            for p in eight:
                served(p, seed=1 + rnd)
            seq = time.perf_counter() - t0
            out: list = [None] * len(eight)
            j0 = joined()

            def one(i: int, rnd: int = rnd, out: list = out) -> None:
                out[i] = served(eight[i], seed=1 + rnd)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(eight))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            conc = time.perf_counter() - t0
            batches = sorted({r.model_extra["qprobe"]["batch_requests"] for r in out})
            rounds.append((seq / conc, seq, conc, batches, joined() - j0))
        print(f"(b) {len(eight)} requests one at a time vs as {len(eight)} concurrent clients, "
              f"{a.rounds} rounds: " + "; ".join(
                  f"{s:.2f} s / {c:.2f} s = {x:.2f}x (sharing {b}, {j} joined)"
                  for x, s, c, b, j in rounds))
        print(f"    median {sorted(r[0] for r in rounds)[len(rounds) // 2]:.2f}x throughput "
              "(goal >= 4x tiny, >= 2.5x SmolLM2); 0 decode steps thrown away (nothing restarts)")
        j1 = joined()

        # (c) load: many requests from 16 clients, no error, memory sampled
        errors, done, lock = [], [0], threading.Lock()
        rss = [rss_mb(proc.pid)]
        todo = iter(range(a.load_requests))

        def worker() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    r = served(PROMPTS[i % len(PROMPTS)], seed=None)
                    assert len(r.choices) == 1
                    with lock:
                        done[0] += 1
                except Exception as e:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(repr(e)[:200])

        workers = [threading.Thread(target=worker) for _ in range(a.load_clients)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:  # the clock stops at the last answer, RSS sampled about once a second
            while w.is_alive():
                w.join(1.0)
                if w.is_alive():
                    rss.append(rss_mb(proc.pid))
        dt = time.perf_counter() - t0
        rss.append(rss_mb(proc.pid))
        mid = rss[len(rss) // 2]
        j2 = joined()
        print(f"(c) {done[0]} of {a.load_requests} requests from {a.load_clients} clients in "
              f"{dt:.1f} s ({done[0] / dt:.1f} req/s), errors {len(errors)}"
              + (f" (first: {errors[0]})" if errors else "")
              + f"; {j2 - j1} joined a running decode")
        print(f"    server RSS MB: before any request {rss0:.0f}, load start {rss[0]:.0f}, "
              f"middle {mid:.0f}, end {rss[-1]:.0f}, max {max(rss):.0f}")

        # (d) guided policy, streamed: time to the first token vs the whole answer
        ttft, total, ntok = [], [], []
        for i in range(a.guided_requests):
            t0 = time.perf_counter()
            first, text = None, ""
            stream = client.completions.create(
                model="m:g", prompt=PROMPTS[i], seed=i, max_tokens=a.guided_tokens,
                temperature=1.0, top_p=1.0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})  # every answer the goal's length
            usage = None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = time.perf_counter() - t0
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    usage = chunk.usage
            total.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else total[-1])
            ntok.append(usage.completion_tokens if usage else -1)
        ratios = [f / t for f, t in zip(ttft, total)]
        print(f"(d) guided (ARM on the model's own state, top_k 20), {a.guided_tokens} tokens "
              f"max, streamed, {a.guided_requests} requests: TTFT p50 {pct(ttft, 50) * 1e3:.1f} "
              f"ms (end-of-sequence ignored), whole answer p50 {pct(total, 50) * 1e3:.1f} ms, "
              f"TTFT / whole p50 {pct(ratios, 50):.3f} max {max(ratios):.3f} (goal <= 0.10); tokens {ntok}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
