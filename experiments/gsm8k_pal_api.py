"""Issue 27, the paper's §6.3 API setting on program-aided GSM8K: completions from an API model
that gives no features, features from local models.

    python experiments/gsm8k_pal_api.py [--out results/gsm8k-pal-api] [--train-limit N] ...

1. starts llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) on 127.0.0.1,
   serving the GGUF of `--model` (default Qwen2.5-Coder-0.5B, the local run's model) with a
   random API key, and stops it at the end;
2. runs the experiment of `--config` (default experiments/gsm8k-pal-qwen-coder.yaml: same task,
   prompts, k, sampling, CV grid, baselines) with the server as the model: every completion
   (train, test, greedy) comes from the server, and its feature from the first `--embedders`
   model run locally on (prompt, completion) (default SmolLM2-135M: a foreign model);
3. for every other embedder (default qwen2.5-coder-0.5b: the served model's own weights, the
   "same model" control) runs the same experiment on the *same* completions (replayed from
   step 2's folders, no server call), embedded by that model;
4. writes OUT/report.md: each run's headline rows side by side, and the server's decode
   throughput against the local decode loop's (OUT/timing.json, the local run's rollouts).

Every stage resumes (the rollouts folders, the probes' inputs), so rerunning the same command
after a crash continues. The server's time and the embedders' time are measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qprobe.backends.base import LanguageModel, Sample, SamplingParams
from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "QPROBE_API_RUN_KEY"  # the server's key, made up per run, only in this process


# ---------------------------------------------------------------- the server


@contextmanager
def llama_server(gguf: Path, alias: str, workdir: Path, threads: int, n_ctx: int,
                 logprobs: bool, ready_timeout: float = 300.0) -> Iterator[str]:
    """llama.cpp's server serving `gguf` as `alias` on 127.0.0.1 (token logprobs on if
    `logprobs`, a random key in $QPROBE_API_RUN_KEY); yields its URL, stops it on exit."""
    from qprobe.backends.llama_server import LlamaCppServer

    key = "sk-" + secrets.token_hex(16)
    model = {"model": str(gguf), "model_alias": alias, "n_ctx": n_ctx, "n_threads": threads,
             "n_threads_batch": threads, "logits_all": logprobs, "verbose": False}
    os.environ[KEY_ENV] = key
    try:
        with LlamaCppServer([model], workdir, api_key=key, ready_timeout=ready_timeout) as srv:
            yield srv.url
    finally:
        os.environ.pop(KEY_ENV, None)


# ---------------------------------------------------------------- models


class Replay(LanguageModel):
    """The completions stored in rollouts folders, handed back as samples (no features): the
    same texts for another embedder. Sampled rows (temperature > 0) come from the folders with
    k > 1, greedy ones from those with k = 1."""

    feature_spec = None

    def __init__(self, folders: list[Path], name: str) -> None:
        from qprobe.rollouts import Rollouts

        self.name, self.max_batch_rows = name, 64
        self.rows: dict[tuple[str, bool], list[Sample]] = {}
        for f in folders:
            r = Rollouts(f)
            greedy = int(r.meta.get("k", 0)) == 1
            prompts, texts, idx = r.column("prompt"), r.column("completion"), r.sample_idx
            lp, nt, fr = (r.column(c) for c in ("logprob_sum", "num_tokens", "finish_reason"))
            for i in sorted(range(len(r)), key=lambda i: int(idx[i])):  # each prompt's in order
                self.rows.setdefault((prompts[i], greedy), []).append(
                    Sample(texts[i], [], fr[i], None, lp[i], nt[i]))

    def sample(self, prompts: list[str], k: int, params: SamplingParams) -> list[list[Sample]]:
        greedy = params.temperature == 0
        out = []
        for p in prompts:
            got = self.rows.get((p, greedy), [])
            if len(got) < k:
                raise QProbeError(f"replay: {len(got)} stored completions for a prompt, {k} wanted "
                                  "(run the server's experiment first, with the same limits)")
            out.append(got[:k])
        return out


class Embedded(LanguageModel):
    """Completions from `source` (a server, or a replay), features from a local `embedder`;
    the time of each side is added to `timing` (a JSON file): the server's against the
    embedder's."""

    def __init__(self, source: LanguageModel, embedder: Any, timing: Path, label: str) -> None:
        self.source, self.embedder, self.timing, self.label = source, embedder, timing, label
        self.name, self.chat = source.name, False
        self.max_batch_rows = source.max_batch_rows

    @property
    def feature_spec(self) -> Any:
        return self.embedder.feature_spec

    def _add(self, key: str, **amounts: float) -> None:
        d = json.loads(self.timing.read_text()) if self.timing.is_file() else {}
        st = d.setdefault(key, {})
        for k, v in amounts.items():
            st[k] = round(st.get(k, 0) + v, 3)
        if st.get("seconds"):
            st["tokens_per_s"] = round(st.get("tokens", 0) / st["seconds"], 2)
        atomic_write_json(self.timing, d)

    def sample(self, prompts: list[str], k: int, params: SamplingParams) -> list[list[Sample]]:
        used0 = getattr(self.source, "completion_tokens", 0)  # the server's usage counts
        t0 = time.perf_counter()
        groups = self.source.sample(prompts, k, params)
        t1 = time.perf_counter()
        used = getattr(self.source, "completion_tokens", 0) - used0
        flat = [(p, s) for p, g in zip(prompts, groups) for s in g]
        feats = self.embedder.embed([p for p, _ in flat], [s.text for _, s in flat])
        t2 = time.perf_counter()
        for (_, s), f in zip(flat, feats):
            s.feature = f
        if not isinstance(self.source, Replay):
            # tokens generated, from the server's usage (the samples' own counts need logprobs)
            tokens = used or sum(s.num_tokens or 0 for _, s in flat)
            self._add("server", seconds=t1 - t0, tokens=tokens, samples=len(flat),
                      prompts=len(prompts))
        self._add(f"embed-{self.label}", seconds=t2 - t1, samples=len(flat), prompts=len(prompts))
        return groups


# ---------------------------------------------------------------- the runs


def _label(name: str) -> str:
    return {"default": "smollm2", "qwen2.5-coder-0.5b": "qwen"}.get(name, Path(name).name)


def run_config(args: argparse.Namespace, label: str, model_name: str) -> Any:
    """The experiment config of one API run: --config with this run's name, folder and limits."""
    from qprobe.experiment import load_config

    sets = [f"name=gsm8k-pal-api-{label}", f"out={Path(args.out) / f'api-{label}'}",
            f"model.name={model_name}", f"train.limit={args.train_limit}"]
    if not args.server_logprobs:  # no log-likelihoods: no rerank rows, no loglik input
        sets += ["baselines.rerank=false", "probes.cv_grid.loglik=[without]"]
    sets += list(args.set or [])
    cfg = load_config(args.config, sets)
    for ts in cfg.test:
        ts.limit = args.test_limit
    return cfg


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1-4 of the module doc; returns {label: results} of every run."""
    from qprobe.backends import load_embedder, load_model
    from qprobe.experiment import run_experiment
    from qprobe.models import resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = out / "timing.json"
    embedders = args.embedders.split(",")
    labels = [_label(e) for e in embedders]
    if len(set(labels)) != len(labels):
        raise QProbeError(f"--embedders: two embedders with the same label {labels}")
    results: dict[str, Any] = {}
    gguf = resolve(args.model)
    first = labels[0]
    with llama_server(Path(gguf), args.model, out, args.threads, args.n_ctx,
                      args.server_logprobs) as url:
        api = load_model(url, backend="openai", model=args.model, api_key_env=KEY_ENV,
                         logprobs=args.server_logprobs,
                         concurrency=1, timeout=600.0)
        cfg = run_config(args, first, url)
        # the embedder reads the text as the served model did (the config's chat setting)
        emb = load_embedder(embedders[0], layer=args.layer, position="last",
                            chat=cfg.model.chat)
        results[first] = run_experiment(cfg, model=Embedded(api, emb, timing, first),
                                        progress=False)
    src = cfg.out_dir / "rollouts"
    folders = [p for p in sorted(src.iterdir()) if (p / "meta.json").is_file()]
    for e, lab in zip(embedders[1:], labels[1:]):
        emb = load_embedder(e, layer=args.layer, position="last", chat=cfg.model.chat)
        cfg_e = run_config(args, lab, f"{args.model} (replayed from api-{first})")
        results[lab] = run_experiment(cfg_e, model=Embedded(Replay(folders, args.model), emb,
                                                            timing, lab), progress=False)
    write_report(args, results, timing)
    return results


def _row(t: dict[str, Any], headline: str | None) -> dict[str, str]:
    f = lambda e: "-" if not e else f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"  # noqa: E731
    g = lambda e: "-" if not e else f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"  # noqa: E731
    pr = t["probes"].get(headline or "", {})
    return {"pass@1": f(t["pass@1"]), "greedy": f(t.get("greedy")),
            "rerank by mean log-prob": f(t.get("rerank_mean_logprob")),
            "majority vote": f(t.get("rules", {}).get("majority_vote")),
            f"probe (headline: {headline})": f(pr.get("mean_over_seeds")),
            "  CV chose": pr.get("cv_chosen", "-"),
            "  probe minus majority vote (paired)": g(pr.get("paired", {}).get("vs_majority_vote")),
            "vote weighted by the probe": f(pr.get("weighted_vote")),
            "pass@k": f(t["pass@k"][str(max(int(k) for k in t["pass@k"]))])}


def write_report(args: argparse.Namespace, results: dict[str, Any], timing: Path) -> Path:
    """OUT/report.md: the runs side by side and the throughputs."""
    from qprobe.experiment.report import headline_objective
    from qprobe.rollouts import Rollouts

    out = Path(args.out)
    labels = list(results)
    cols = {}
    for lab, res in results.items():
        h = headline_objective(res)
        t = next(iter(res["test"].values()))
        cols[lab] = (_row(t, h and h["objective"]), t["n_prompts"], res["train"]["n_prompts"])
    keys = list(next(iter(cols.values()))[0])
    lines = ["# GSM8K / PAL in the API setting (issue 27)", "",
             f"Completions from llama.cpp's server serving `{args.model}` (GGUF) on loopback; "
             "features from a local model run on (prompt, completion). Every run has the same "
             "completions (the later ones replay the first's); only the features differ. "
             f"Command: `python experiments/gsm8k_pal_api.py {' '.join(sys.argv[1:])}`.", "",
             "| row | " + " | ".join(f"features: {lab}" for lab in labels) + " |",
             "|---|" + "---|" * len(labels),
             "| train / test prompts | " + " | ".join(f"{c[2]} / {c[1]}" for c in cols.values()) + " |"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(cols[lab][0][k] for lab in labels) + " |")
    tm = json.loads(timing.read_text()) if timing.is_file() else {}
    lines += ["", "## Throughput", "", "| what | seconds | samples | tokens/s |", "|---|---|---|---|"]
    for key, st in tm.items():
        lines.append(f"| {key} | {st.get('seconds', 0):.0f} | {st.get('samples', 0):.0f} | "
                     f"{st.get('tokens_per_s', '-')} |")
    local = Path(args.local) / "rollouts"
    if local.is_dir():
        for name in ("train", *results[labels[0]]["test"]):
            p = local / name
            if (p / "meta.json").is_file():
                s = Rollouts(p).meta.get("summary") or {}
                lines.append(f"| local decode loop ({args.local}, {name}; sandboxed scoring "
                             f"included) | {s.get('seconds', 0):.0f} | {s.get('new_rows', 0)} | "
                             f"{s.get('tokens_per_s', '-')} |")
    lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gsm8k-pal-api")
    ap.add_argument("--config", default=str(ROOT / "experiments" / "gsm8k-pal-qwen-coder.yaml"))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="the GGUF the server serves")
    ap.add_argument("--embedders", default="default,qwen2.5-coder-0.5b",
                    help="local feature models, comma-separated; the first one's run samples")
    ap.add_argument("--layer", type=int, default=None, help="embedder layer (default ~80%% depth)")
    ap.add_argument("--train-limit", type=int, default=40)
    ap.add_argument("--test-limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="server threads")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--server-logprobs", action="store_true",
                    help="ask the server for token log-probs (llama-cpp-python's server: 7-10x "
                         "the time per sample, bench/llama_server_logprobs.py); off: the runs have no "
                         "log-likelihood rows or inputs, and the vote's ties go by sample order")
    ap.add_argument("--local", default="results/gsm8k-pal-qwen-coder",
                    help="the local run whose decode throughput is compared")
    ap.add_argument("--set", action="append", help="config override KEY=VALUE (qprobe run --set)")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server started here is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_all(args)
    except QProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
