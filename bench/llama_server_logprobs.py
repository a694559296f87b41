"""What do token log-probs cost on llama-cpp-python's OpenAI-compatible server? Side by side in
one run: the same GGUF served twice on loopback (once with `logits_all`, which the server needs
for log-probs, once without), the same GSM8K/PAL prompt, 64 new tokens, three requests each (the
first fills the server's prompt cache, the next ones reuse it). Why experiments/gsm8k_pal_api.py
asks for no log-probs unless `--server-logprobs` (docs/gsm8k-pal.md).

    python bench/llama_server_logprobs.py [--model qwen2.5-coder-0.5b] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from qprobe.backends.llama_server import LlamaCppServer
from qprobe.models import resolve
from qprobe.tasks import load_task

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    gguf = str(resolve(a.model))
    prompt = load_task("gsm8k-pal-3shot").prompts("train", limit=1)[0]["prompt"]
    work = Path(tempfile.mkdtemp(prefix="qprobe-llama-lp-"))
    times: dict[bool, list[float]] = {}
    for logprobs in (True, False):
        model = {"model": gguf, "model_alias": "m", "n_ctx": 2048, "n_threads": a.threads,
                 "n_threads_batch": a.threads, "logits_all": logprobs, "verbose": False}
        with LlamaCppServer([model], work / str(logprobs)) as srv:
            times[logprobs] = []
            for i in range(3):
                body = {"model": "m", "prompt": prompt, "max_tokens": a.tokens,
                        "temperature": 0.8, "seed": i, **({"logprobs": 1} if logprobs else {})}
                req = urllib.request.Request(srv.url + "/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                t0 = time.perf_counter()
                with _NO_PROXY.open(req, timeout=600) as r:
                    out = json.loads(r.read())
                times[logprobs].append(time.perf_counter() - t0)
                print(f"log-probs {'on ' if logprobs else 'off'} request {i}: "
                      f"{times[logprobs][-1]:.1f} s, {out['usage']['prompt_tokens']} prompt + "
                      f"{out['usage']['completion_tokens']} new tokens, "
                      f"{len(out['choices'])} choice(s)", flush=True)
    on, off = sorted(times[True][1:]), sorted(times[False][1:])
    print(f"after the first request: {on[0]:.1f}-{on[-1]:.1f} s with log-probs, "
          f"{off[0]:.1f}-{off[-1]:.1f} s without: {min(on) / max(off):.1f}x or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
