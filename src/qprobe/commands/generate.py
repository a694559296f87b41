"""`qprobe generate`: sample k completions, score them with a probe, print the chosen one."""

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
    probe: str = field(default="", metadata={
        "required": True, "metavar": "PROBE_DIR", "help": "trained probe folder"})
    k: int = field(default=8, metadata={"help": "number of candidates"})
    beta: float | None = field(default=None, metadata={
        "help": "selection temperature; 0 = argmax (default: the probe's beta)"})
    embedder: str | None = field(default=None, metadata={
        "help": "local model computing the features when --model is an API server"})
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
        help="best-of-k generation: sample k, score with a probe, print the choice",
        description="Sample K completions of PROMPT from MODEL, score each with the probe on the "
        "model's own features, and print the completion the policy softmax(Q/beta) chooses.",
    )
    add_flags(p, GenerateOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.backends import SamplingParams, load_embedder, load_model, resolve
    from qprobe.errors import QProbeError
    from qprobe.policy import QProbePolicy
    from qprobe.probe import Probe
    from qprobe.tasks import get_task

    o = from_args(GenerateOptions, args)
    prompt = sys.stdin.read() if o.prompt == "-" else o.prompt
    probe = Probe.load(o.probe)
    spec = probe.feature_spec
    if spec is None and probe.feature_dim:
        raise QProbeError(f"{o.probe}: probe has no feature spec; cannot pick a model layer")
    params = SamplingParams(
        temperature=o.temperature,
        top_p=o.top_p,
        max_new_tokens=o.max_new_tokens,
        stop=list(o.stop) + (list(get_task(o.task, data=o.data).stop) if o.task else []),
        seed=o.seed,
    )
    is_api = not resolve(o.model, o.backend).own_features  # text only: needs an embedder
    embedder = None
    if spec is None:  # a probe on log-likelihoods alone: the model's own, no features
        pass
    elif o.embedder:
        embedder = load_embedder(o.embedder, layer=spec.layer, position=spec.position)
    elif is_api:
        raise QProbeError(
            "generate: an API --model needs --embedder (the local model of the probe)"
        )
    if is_api:
        model = load_model(o.model, backend=o.backend)
    else:
        model = load_model(
            o.model,
            backend=o.backend,
            **({} if spec is None else {"layer": spec.layer, "position": spec.position,
                                        "feature_dtype": spec.dtype}),
            features=embedder is None and spec is not None,
        )
    policy = QProbePolicy(model, probe, k=o.k, beta=o.beta, params=params, embedder=embedder,
                          seed=o.seed, include_greedy=o.include_greedy)
    choice = policy.generate([prompt])[0]
    if o.all:
        print(json.dumps({"beta": policy.beta, "k": policy.k, **choice.to_dict()}, indent=2))
    else:
        print(choice.text)
    return 0
