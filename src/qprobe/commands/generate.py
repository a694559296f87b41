"""`qprobe generate`: answer a prompt with any policy of the registry (`--policy SPEC`, see
`policy/specs.py`), e.g. best-of-k with a probe (`--probe DIR`, the short form of
`--policy best-of-k:probe=DIR`) or reward-guided decoding (`--guide HEAD --beta B`, the short
form of `--policy guided:head=HEAD,beta=B`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args
from qprobe.defaults import MAX_NEW_TOKENS, TEMPERATURE, TOP_P


@dataclass
class GenerateOptions:
    prompt: str = field(default="", metadata={
        "positional": True, "metavar": "PROMPT", "help": "the prompt ('-' reads it from stdin)"})
    model: str = field(default="default", metadata={
        "show_default": False,
        "help": "model: 'default' (embedded SmolLM2-135M), a .gguf, a folder, or an "
                "http(s):// OpenAI-compatible server (then --embedder is needed)"})
    backend: str | None = field(default=None, metadata={
        "help": "backend: hf or openai (default: openai for an http(s):// --model, else hf)"})
    policy: str = field(default="", metadata={
        "metavar": "SPEC", "help": "the policy, KIND[:key=value,...]; kinds: sample, greedy, "
        "best-of-k (probe=, k=, beta=), logprob (reduce=mean|sum, k=), guided (head=, beta=, "
        "top_k=, inverse=), qadapter / dpo (adapter=); see docs/serve.md"})
    probe: str = field(default="", metadata={
        "metavar": "PROBE_DIR", "help": "trained probe folder (best-of-k; short for --policy "
                                        "best-of-k:probe=PROBE_DIR with --k, --beta)"})
    guide: str = field(default="", metadata={
        "metavar": "HEAD_DIR", "help": "reward head (qprobe train-head): guided decoding instead "
                                       "of best-of-k; --beta is then the reward weight"})
    k: int = field(default=8, metadata={
        "help": "number of candidates (with --guide: guided samples drawn; --all prints them)"})
    beta: float | None = field(default=None, metadata={
        "help": "selection temperature; 0 = argmax (default: the probe's beta); with --guide: "
                "logits + beta * r on the top-k (required)"})
    guide_top_k: int = field(default=20, metadata={
        "help": "--guide: next-token candidates scored per step"})
    inverse: bool = field(default=False, metadata={
        "action": "store_true", "help": "--guide: steer away from the reward (1 - r)"})
    reward_model: str | None = field(default=None, metadata={
        "help": "--guide: the model a head on another model's states reads (default: the one "
                "recorded in the head)"})
    chat: bool | None = field(default=None, metadata={
        "help": "wrap the prompt in the chat template (default: a guided head's setting, else "
                "the model's: on when it has a template)"})
    embedder: str | None = field(default=None, metadata={
        "help": "local model computing the features when --model is an API server"})
    device: str | None = field(default=None, metadata={
        "help": "cpu / cuda for the local model and embedder (default: cuda if any)"})
    temperature: float = field(default=TEMPERATURE, metadata={"help": "sampling temperature"})
    top_p: float = field(default=TOP_P, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "tokens per completion"})
    stop: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "stop string (repeatable)"})
    task: str | None = field(default=None, metadata={
        "help": "also stop at this task's stop strings (e.g. times-tables, mbpp)"})
    data: str | None = field(default=None, metadata={
        "help": "local data folder of --task (default: $QPROBE_DATA, ../shared/data, the cache)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and choice"})
    include_greedy: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "make the greedy completion one of the k candidates (k-1 samples beside it)"})
    all: bool = field(default=False, metadata={
        "action": "store_true",
        "help": "print JSON with every candidate, its score and selection weight"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer a prompt with a policy: best-of-k with a probe, guided decoding, ...",
        description="Answer PROMPT with a policy over MODEL: by default (--probe) sample K "
        "completions, score each with the probe on the model's own features, and print the one "
        "softmax(Q/beta) chooses; --guide or --policy SPEC for the other kinds.",
    )
    add_flags(p, GenerateOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.backends import SamplingParams
    from qprobe.errors import QProbeError
    from qprobe.policy import registry, specs
    from qprobe.policy.loading import ModelContext
    from qprobe.tasks import get_task

    o = from_args(GenerateOptions, args)
    prompt = sys.stdin.read() if o.prompt == "-" else o.prompt
    if sum(map(bool, (o.policy, o.probe, o.guide))) != 1:
        raise QProbeError("generate: give --probe PROBE_DIR (best-of-k), --guide HEAD_DIR "
                          "(guided) or --policy SPEC")
    task = get_task(o.task, data=o.data) if o.task else None
    ctx = ModelContext(o.model, backend=o.backend, embedder_name=o.embedder, device=o.device,
                       chat=o.chat)
    from qprobe.tasks.code import CodeTask

    if isinstance(task, CodeTask):
        ctx.visible = task.visible_reward
    if o.probe:
        cfg = specs.BestOfKSpec(probe=o.probe, k=o.k, beta=o.beta,
                                include_greedy=o.include_greedy)
        policy = registry.build_config("best-of-k", cfg, ctx)
    elif o.guide:
        if o.beta is None:
            raise QProbeError("generate: --guide needs --beta (the reward weight; 0: plain "
                              "top-k)")
        cfg = specs.GuidedSpec(head=o.guide, beta=o.beta, top_k=o.guide_top_k,
                               inverse=o.inverse, reward_model=o.reward_model)
        policy = registry.build_config("guided", cfg, ctx)
    else:
        policy = registry.build(o.policy, ctx)
    params = SamplingParams(
        temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens,
        stop=list(o.stop) + (list(task.stop) if task is not None else []), seed=o.seed)
    n = o.k if (o.all and policy.per_token) else 1
    answer = policy.generate([prompt], params, seed=o.seed, n=n)[0]
    if o.all:
        print(json.dumps({**policy.describe(), **answer.to_dict()}, indent=2))
    else:
        print(answer.text)
    return 0
