"""`qprobe train-head ROLLOUTS... --out HEAD_DIR`: a token-level reward head for guided decoding.

Reads the stored token ids and rewards of rollouts folders, runs the trunk model once over each
sequence (stopped at the head's block), and trains a RAD or ARM head with RAD's cumulative MSE,
or distils an ARM head from a RAD head (`--distill-from`). Every `HeadConfig` field is a flag.
"""

from __future__ import annotations

import argparse
from typing import Any

from qprobe.commands.flags import add_flags, from_args


def register(subparsers: Any) -> None:
    from qprobe.head_config import HeadConfig

    p = subparsers.add_parser(
        "train-head",
        help="train a token-level reward head (RAD / ARM) for guided decoding",
        description="Train a reward head on the sampled tokens and sequence rewards of ROLLOUTS "
        "(one forward pass over the stored token ids for the per-token hidden states) and write "
        "HEAD_DIR (head.safetensors + config.json). Use it with `qprobe generate --guide`.",
    )
    p.add_argument("rollouts", nargs="+", metavar="ROLLOUTS_DIR", help="rollouts folder(s)")
    p.add_argument("--out", required=True, metavar="HEAD_DIR", help="head folder to write")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    add_flags(p, HeadConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.head_config import HeadConfig
    from qprobe.policy.head_train import train_head

    cfg = from_args(HeadConfig, args)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    head = train_head(list(args.rollouts), cfg, say=say)
    out = head.save(args.out)
    t = head.info["training"]
    print(f"wrote {out} ({head.kind} head, rank {head.rank}, block {head.feature_spec.layer} of "
          f"{head.feature_spec.model}; {t['samples']} samples, {t['tokens']} tokens, loss "
          f"{t['final_loss']:.4f}, {t['seconds']:.1f}s)", flush=True)
    return 0
