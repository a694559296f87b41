"""`qprobe generate`: best-of-k with a probe (sample k, score, print the choice), or
reward-guided decoding with a token-level head (`--guide HEAD --beta B`)."""

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
        "metavar": "PROBE_DIR", "help": "trained probe folder (best-of-k)"})
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
        "help": "--guide: wrap the prompt in the chat template (default: as the head was "
                "trained)"})
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
    if bool(o.probe) == bool(o.guide):
        raise QProbeError("generate: give --probe PROBE_DIR (best-of-k) or --guide HEAD_DIR")
    if o.guide:
        return _guided(o, prompt)
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
        embedder = load_embedder(o.embedder, layer=spec.layer, position=spec.position,
                                 device=o.device)
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
            device=o.device,
            **({} if spec is None else {"layer": spec.layer, "position": spec.position,
                                        "feature_dtype": spec.dtype}),
            features=embedder is None and spec is not None,
        )
    visible = None
    if "visible_pass" in probe.extras:
        from qprobe.tasks.code import CodeTask

        task = get_task(o.task, data=o.data) if o.task else None
        if not isinstance(task, CodeTask):
            raise QProbeError("generate: this probe reads visible_pass; give --task, a code task "
                              "whose prompts show tests (the prompt must be one of its prompts)")
        visible = task.visible_reward
    policy = QProbePolicy(model, probe, k=o.k, beta=o.beta, params=params, embedder=embedder,
                          seed=o.seed, include_greedy=o.include_greedy, visible=visible)
    choice = policy.generate([prompt])[0]
    if o.all:
        print(json.dumps({"beta": policy.beta, "k": policy.k, **choice.to_dict()}, indent=2))
    else:
        print(choice.text)
    return 0


def _guided(o: GenerateOptions, prompt: str) -> int:
    from qprobe.backends import SamplingParams, load_model, resolve
    from qprobe.backends.hf import load_hf
    from qprobe.errors import QProbeError
    from qprobe.policy.guided import GuideConfig, GuidedSampler
    from qprobe.policy.heads import RewardHead
    from qprobe.tasks import get_task

    if o.beta is None:
        raise QProbeError("generate: --guide needs --beta (the reward weight; 0: plain top-k)")
    if not resolve(o.model, o.backend).own_features:
        raise QProbeError("generate: --guide runs inside the local decode loop; --model must be "
                          "a local model")
    head = RewardHead.load(o.guide)
    spec = head.feature_spec
    if spec is None:
        raise QProbeError(f"{o.guide}: the head has no feature spec")
    chat = spec.model.endswith("+chat") if o.chat is None else o.chat
    # At the head's block, an ARM head on this model reads the loop's own state (no extra pass).
    model = load_model(o.model, backend=o.backend, layer=spec.layer, chat=chat, features=False,
                       device=o.device)
    trunk = None
    if spec.model != model._spec.model:  # a head on another model's states: load that one
        name = o.reward_model or head.trunk
        if not name:
            raise QProbeError(f"{o.guide}: reads {spec.model!r}; pass --reward-model")
        trunk = load_hf(name, device=o.device)
    sampler = GuidedSampler(model, head, GuideConfig(beta=o.beta, top_k=o.guide_top_k,
                                                     inverse=o.inverse), trunk)
    params = SamplingParams(
        temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens,
        stop=list(o.stop) + (list(get_task(o.task).stop) if o.task else []), seed=o.seed)
    samples = sampler.sample([prompt], o.k if o.all else 1, params)[0]
    if o.all:
        print(json.dumps({"method": sampler.method, "beta": o.beta, "top_k": o.guide_top_k,
                          **sampler.cost(), "samples": [s.text for s in samples]}, indent=2))
    else:
        print(samples[0].text)
    return 0
