"""`qprobe embed ROLLOUTS...`: log-likelihoods and more feature sets for stored samples."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from qprobe.commands.flags import comma_list


def register(subparsers: Any) -> None:
    from qprobe.embed_config import EmbedConfig

    h = {f.name: f.metadata.get("help", "") for f in fields(EmbedConfig)}
    p = subparsers.add_parser(
        "embed",
        help="re-encode stored samples: log-likelihoods and features at more layers/positions",
        description="Run the model once over each stored (prompt, completion) of ROLLOUTS and "
        "store, beside the original features, every sample's log-likelihood (logprob_sum, "
        "logprob_tokens) and named feature sets such as L12-mean, without sampling again. "
        "Resumable: re-running continues where a killed run stopped.",
    )
    p.add_argument("rollouts", nargs="+", help="Rollouts folder(s) to re-encode.")
    p.add_argument("--model", default=None, help=h["model"])
    p.add_argument("--layers", type=comma_list(int), default=None, metavar="N,N,...", help=h["layers"])
    p.add_argument("--positions", type=comma_list(str), default=["last", "mean"], metavar="last,mean",
                   help=h["positions"])
    p.add_argument("--skip-stored", action=argparse.BooleanOptionalAction, default=True,
                   help=h["skip_stored"])
    p.add_argument("--limit-shards", type=int, default=None, help=h["limit_shards"])
    p.add_argument("--device", default=None, help=h["device"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help=h["progress"])
    p.add_argument("--json", action="store_true", help="Print each folder's summary as JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.backends.hf import load_hf
    from qprobe.embed import EmbedConfig, embed_rollouts, model_for

    bundle = None
    for folder in args.rollouts:
        cfg = EmbedConfig(rollouts=folder, model=args.model, layers=args.layers,
                          positions=args.positions, skip_stored=args.skip_stored,
                          limit_shards=args.limit_shards, device=args.device, progress=args.progress)
        name = model_for(cfg)
        if bundle is None or bundle[0] != name:  # one load for folders of the same model
            bundle = (name, load_hf(name, device=args.device))
        summary = embed_rollouts(cfg, model_bundle=bundle[1])
        if args.json:
            print(json.dumps(summary))
    return 0
