"""`HeadConfig`: what `qprobe train-head` trains (torch-free, so `qprobe --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeadConfig:
    """What `qprobe train-head` trains (every field is a command line flag)."""

    kind: str = field(default="arm", metadata={
        "choices": ["rad", "arm"],
        "help": "rad: linear head on the state after each token (k trunk forwards per decoded "
                "token); arm: bilinear head e_v^T W h + b.h (one, or none on the own model)"})
    rank: int = field(default=64, metadata={"help": "arm: rank of W (the width: full rank)"})
    model: str | None = field(default=None, metadata={
        "help": "trunk model whose hidden states the head reads (default: the rollouts' model, "
                "which makes it an own-hidden-state head); it must use the rollouts' tokenizer "
                "(the stored token ids are read as they are; decoding checks the head's "
                "tokenizer against the sampling model's)"})
    layer: int | None = field(default=None, metadata={
        "help": "block the head reads (default: the rollouts' feature layer; negative: from "
                "the top)"})
    label_threshold: float | None = field(default=None, metadata={
        "help": "label = 1 if reward > this else 0 (default: the reward itself)"})
    link: str = field(default="sigmoid", metadata={
        "choices": ["sigmoid", "identity"], "help": "reward = link(raw head output)"})
    pairs: bool = field(default=False, metadata={
        "help": "arm only: train on preference pairs (rows with role chosen / rejected, as "
                "`qprobe collect` stores them) instead of rewards: the sequence score is the sum "
                "of the head's per-token raw outputs, fitted by the Bradley-Terry loss "
                "-log sigmoid(score(chosen) - score(rejected)) (an autoregressive reward model; "
                "link identity, so guiding adds beta * that token's share of the score, "
                "unclamped by default)"})
    distill_from: str | None = field(default=None, metadata={
        "help": "arm only: fit the head to this rad head's scores of prefix + next token "
                "instead of to the labels (the rad head must read the same model, at any block)"})
    epochs: int = field(default=30, metadata={"help": "passes over all token positions"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    batch: int = field(default=4096, metadata={"help": "token positions per step"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    seed: int = field(default=0, metadata={"help": "initialisation and shuffling seed"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)"})
