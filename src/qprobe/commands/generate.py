"""`qprobe generate`: sample k completions, score them with a probe, print the chosen one."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="best-of-k generation: sample k, score with a probe, print the choice",
        description="Sample K completions of PROMPT from MODEL, score each with the probe on the "
        "model's own features, and print the completion the policy softmax(Q/beta) chooses.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    p.add_argument(
        "--model",
        default="default",
        help="model: 'default' (embedded SmolLM2-135M), a .gguf, a folder, or an "
        "http(s):// OpenAI-compatible server (then --embedder is needed)",
    )
    p.add_argument("--backend", default=None,
                   help="backend: hf or openai (default: openai for an http(s):// --model, else hf)")
    p.add_argument("--probe", required=True, metavar="PROBE_DIR", help="trained probe folder")
    p.add_argument("--k", type=int, default=8, help="number of candidates (default 8)")
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="selection temperature; 0 = argmax (default: the probe's beta)",
    )
    p.add_argument(
        "--embedder",
        default=None,
        help="local model computing the features when --model is an API server",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (0.95)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion (256)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--task",
        default=None,
        help="also stop at this task's stop strings (e.g. times-tables, mbpp)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and choice (0)")
    p.add_argument(
        "--all",
        action="store_true",
        help="print JSON with every candidate, its score and selection weight",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.backends import SamplingParams, load_embedder, load_model, resolve
    from qprobe.errors import QProbeError
    from qprobe.generate import QProbePolicy
    from qprobe.probe import Probe
    from qprobe.tasks import get_task

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    probe = Probe.load(args.probe)
    spec = probe.feature_spec
    if spec is None:
        raise QProbeError(f"{args.probe}: probe has no feature spec; cannot pick a model layer")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop=list(args.stop) + (list(get_task(args.task).stop) if args.task else []),
        seed=args.seed,
    )
    is_api = not resolve(args.model, args.backend).own_features  # text only: needs an embedder
    embedder = None
    if args.embedder:
        embedder = load_embedder(args.embedder, layer=spec.layer, position=spec.position)
    elif is_api:
        raise QProbeError(
            "generate: an API --model needs --embedder (the local model of the probe)"
        )
    if is_api:
        model = load_model(args.model, backend=args.backend)
    else:
        model = load_model(
            args.model,
            backend=args.backend,
            layer=spec.layer,
            position=spec.position,
            features=embedder is None,
            feature_dtype=spec.dtype,
        )
    policy = QProbePolicy(
        model, probe, k=args.k, beta=args.beta, params=params, embedder=embedder, seed=args.seed
    )
    choice = policy.generate([prompt])[0]
    if args.all:
        print(json.dumps({"beta": policy.beta, "k": policy.k, **choice.to_dict()}, indent=2))
    else:
        print(choice.text)
    return 0
