"""`qprobe collect`: sample k completions per prompt with features into a rollouts folder."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from qprobe import defaults
from qprobe.backends.registry import BACKENDS
from qprobe.collect.config import CollectConfig, RayConfig

_HELP = {f.name: f.metadata.get("help", "") for f in fields(CollectConfig)}
_RAY = {f.name: f.metadata.get("help", "") for f in fields(RayConfig)}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "collect",
        help="sample k completions per prompt, with features and rewards, into a rollouts folder",
        description="Draw K completions per prompt of TASK/SPLIT from MODEL, capture each one's "
        "Q-probe feature during generation, score it with the task's reward, and append it to "
        "the rollouts folder OUT (one shard per batch). Re-running the same command resumes; "
        "other settings on an existing OUT are refused.",
    )
    p.add_argument("--out", required=True, help=_HELP["out"])
    p.add_argument("--model", default=None, help=_HELP["model"] + " A .gguf file, a transformers "
                   "folder, a hub id, qwen2.5-coder-0.5b, or an http(s):// OpenAI-compatible server.")
    p.add_argument("--backend", choices=list(BACKENDS), default=None, help=_HELP["backend"])
    p.add_argument("--task", required=True, help=_HELP["task"])
    p.add_argument("--split", default=None, help=_HELP["split"])
    p.add_argument("--k", type=int, default=None, help=_HELP["k"])
    p.add_argument("--layer", type=int, default=None, help=_HELP["layer"] + " (default ~80%% depth)")
    p.add_argument("--position", choices=["last", "mean"], default="last", help=_HELP["position"])
    p.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16",
                   help=_HELP["feature_dtype"])
    p.add_argument("--limit", type=int, default=None, help=_HELP["limit"])
    p.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=_HELP["max_new_tokens"] + f" ({defaults.MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=defaults.TEMPERATURE,
                   help=_HELP["temperature"] + f" ({defaults.TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=defaults.TOP_P,
                   help=_HELP["top_p"] + f" ({defaults.TOP_P})")
    p.add_argument("--seed", type=int, default=0, help=_HELP["seed"] + " (0)")
    p.add_argument("--batch-prompts", type=int, default=None, help=_HELP["batch_prompts"])
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None, help=_HELP["chat"])
    p.add_argument("--data", default=None, help=_HELP["data"])
    p.add_argument("--device", default=None, help=_HELP["device"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help=_HELP["dtype"])
    p.add_argument("--embedder", default=None, help=_HELP["embedder"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    p.add_argument("--adapter", default=None, metavar="ADAPTER_DIR", help=_HELP["adapter"])
    p.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                   help=_HELP["pairs"])
    g = p.add_argument_group("scale-out (docs/scale-out.md)")
    g.add_argument("--executor", choices=["local", "ray"], default="local", help=_HELP["executor"])
    g.add_argument("--address", default=None, help=_RAY["address"])
    g.add_argument("--workers", type=int, default=None, help=_RAY["workers"])
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help=_RAY["gpus_per_worker"])
    g.add_argument("--threads-per-worker", type=int, default=1,
                   help=_RAY["threads_per_worker"] + " (1)")
    g.add_argument("--retries", type=int, default=2, help=_RAY["retries"] + " (2)")
    g.add_argument("--storage", choices=["auto", "shared", "driver"], default="auto",
                   help=_RAY["storage"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.collect import collect

    ray = RayConfig(**{n: getattr(args, n) for n in _RAY})
    cfg = CollectConfig(**{f.name: getattr(args, f.name) for f in fields(CollectConfig)
                           if f.name != "ray"}, ray=ray)
    s = collect(cfg)
    mean = "n/a" if s["mean_reward"] is None else f"{s['mean_reward']:.4f}"
    print(
        f"collect: {s['rows']} rows ({s['new_rows']} new) for {s['prompts']} prompts in {cfg.out}; "
        + (f"{s['pairs']} pairs; " if "pairs" in s else "") +
        f"scored {s['scored']}, mean reward {mean}; {s['seconds']:.1f} s, "
        f"{s['tokens_per_s'] or 0:.0f} tok/s",
        file=sys.stderr,
    )
    print(json.dumps({k: v for k, v in s.items() if k != "config"}))
    return 0
