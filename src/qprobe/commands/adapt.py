"""`qprobe adapt`: train a preference adapter (Q-Adapter or DPO) on pairs; `qprobe adapt-eval`:
its held-out pair accuracy. Sampling from an adapter: `qprobe collect --adapter DIR`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

from qprobe.commands.flags import add_flags, from_args


@dataclass
class AdaptEvalOptions:
    adapter: str = field(default="", metadata={
        "positional": True, "metavar": "ADAPTER_DIR", "help": "folder written by `qprobe adapt`"})
    task: str = field(default="hh-harmless", metadata={"help": "preference task or pair file"})
    split: str = field(default="test", metadata={"help": "split of held-out pairs"})
    data: str | None = field(default=None, metadata={"help": "local data folder for the task"})
    limit: int | None = field(default=None, metadata={"help": "only the first N pairs"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda"})
    text: str | None = field(default=None, metadata={
        "metavar": "FILE", "help": "instead of pairs: perplexity of held-out general text "
        "(JSONL, or .txt paragraphs) under the base model and under the adapter's policy"})
    text_fields: str = field(default="text", metadata={
        "help": "with --text: the JSONL fields that make a text, comma-separated, joined by newlines"})
    max_tokens: int = field(default=256, metadata={"help": "with --text: tokens kept per text"})
    json: str | None = field(default=None, metadata={
        "metavar": "OUT", "help": "also write the numbers as JSON"})


def register(subparsers: argparse._SubParsersAction) -> None:
    from qprobe.adapters.config import AdaptConfig

    p = subparsers.add_parser(
        "adapt",
        help="train a LoRA on preference pairs: Q-Adapter, or DPO with TRL (resumable)",
        description="Train a LoRA adapter on the pairs of a preference task (Q-Adapter: the "
        "adapter's logits are a residual Q-function; dpo: TRL's DPOTrainer) and write OUT "
        "(adapter/ + adapter.json). Checkpoints every --save-every steps; re-running the same "
        "command resumes. Needs peft (and trl for dpo): pip install 'qprobe[adapters]'.",
    )
    add_flags(p, AdaptConfig)
    p.set_defaults(func=run)
    e = subparsers.add_parser(
        "adapt-eval",
        help="held-out pair accuracy of an adapter's implicit reward",
        description="Pair accuracy (chosen scored above rejected) of an adapter's implicit "
        "reward on held-out pairs, with a 95%% bootstrap CI over prompts. Q-Adapter: the "
        "summed per-token reward; DPO: beta * log(pi / pi_ref).",
    )
    add_flags(e, AdaptEvalOptions)
    e.set_defaults(func=run_eval)


def run(args: argparse.Namespace) -> int:
    from qprobe.adapters.config import AdaptConfig

    cfg = from_args(AdaptConfig, args)
    cfg.validate()
    from qprobe.adapters.methods import method

    info = method(cfg.method).train(cfg)
    print(f"wrote {cfg.out} ({info['method']}, {info['pairs']} pairs, {info['steps']} steps, "
          f"{info['seconds']:.0f}s; final {json.dumps(info['final'])})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from qprobe.adapters.policy import evaluate_adapter

    o = from_args(AdaptEvalOptions, args)
    if o.text:
        from qprobe.adapters.forgetting import perplexity, read_texts

        texts = read_texts(o.text, [f for f in o.text_fields.split(",") if f], o.limit)
        res = perplexity(o.adapter, texts, o.max_tokens, o.bootstrap, o.seed, o.device)
        lo, hi = res["ratio_ci"]
        print(f"{o.adapter} ({res['method']}): {res['n_texts']} texts of {o.text} "
              f"({res['n_tokens']} tokens); perplexity base {res['ppl_base']:.3f}, adapter "
              f"{res['ppl_adapter']:.3f}, ratio {res['ratio']:.4f} [{lo:.4f}, {hi:.4f}]")
        _write_json(o.json, res)
        return 0
    res = evaluate_adapter(o.adapter, o.task, o.split, o.data, o.limit, o.bootstrap, o.seed,
                           o.device)
    print(f"{o.adapter} ({res['method']}): {res['n_pairs']} pairs of {o.task}/{o.split}; "
          f"pair accuracy {res['accuracy'].fmt()}, mean margin {res['margin_mean']:.3f}")
    _write_json(o.json, {**res, "accuracy": asdict(res["accuracy"])})
    return 0


def _write_json(path: str | None, obj: dict) -> None:
    """Write `obj` atomically to `path` (creating its folder); nothing when path is None."""
    if not path:
        return
    from pathlib import Path

    from qprobe.fileio import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(obj, indent=2))
