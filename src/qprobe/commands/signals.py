"""`qprobe signals ROLLOUTS --task T`: execution signals of stored code candidates, as columns."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from qprobe.commands.flags import add_flags, from_args


@dataclass
class SignalsOptions:
    rollouts: list[str] = field(default_factory=list, metadata={
        "positional": True, "nargs": "+", "type": str, "metavar": "ROLLOUTS",
        "help": "rollouts folder(s)"})
    task: str = field(default="", metadata={"required": True, "help": "code task (mbpp, humaneval)"})
    data: str | None = field(default=None, metadata={"help": "data folder for the task"})
    exec: bool = field(default=False, metadata={
        "action": "store_true", "help": "run each candidate on its prompt's shown test: columns "
        "visible_status (error class) and exec_sig (outputs on the shown inputs, MBR-exec)"})
    fuzz: bool = field(default=False, metadata={
        "help": "run every candidate on calls next to the shown ones (one literal argument "
                "changed): column fuzz_sig (MBR-exec among the candidates passing the shown test)"})
    gen_tests: bool = field(default=False, metadata={
        "action": "store_true", "help": "sample tests with --model (CodeT's prompt) and store "
        "them in ROLLOUTS/gen_tests/"})
    gen_exec: bool = field(default=False, metadata={
        "action": "store_true", "help": "run each candidate on its prompt's model-written tests: "
        "columns gen_passed, gen_tests, gen_sig (CodeT, MBR-exec on their inputs)"})
    model: str | None = field(default=None, metadata={
        "help": "model that writes the tests (--gen-tests), e.g. qwen2.5-coder-0.5b"})
    device: str | None = field(default=None, metadata={"help": "device of the model"})
    samples: int = field(default=8, metadata={"help": "test-writing samples per prompt"})
    max_new_tokens: int = field(default=96, metadata={"help": "tokens per test-writing sample"})
    temperature: float = field(default=0.8, metadata={"help": "test-writing temperature"})
    max_tests: int = field(default=10, metadata={"help": "model-written tests kept per prompt"})
    batch_prompts: int = field(default=4, metadata={"help": "prompts per test-writing batch"})
    limit: int | None = field(default=None, metadata={
        "help": "only the first N prompts of each folder (in folder order)"})
    timeout: float = field(default=3.0, metadata={
        "help": "seconds per program for --exec (3, as the rewards and visible_reward use)"})
    gen_timeout: float = field(default=10.0, metadata={"help": "seconds per program, --gen-exec"})
    per_step: float = field(default=1.0, metadata={
        "help": "seconds each input or test may run inside a program"})
    workers: int = field(default=0, metadata={"help": "sandbox workers; 0 = 2 x cores"})
    chunk: int = field(default=20, metadata={"help": "prompts per written chunk"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "signals",
        help="execution signals of code candidates (error class, MBR-exec, CodeT) as columns",
        description="Fill execution columns of code rollouts, resumably (only rows still null are "
        "computed; a stopped run keeps every finished chunk). --exec: the error class of the "
        "prompt's shown test and an execution signature on its inputs; --gen-tests: tests "
        "written by --model; --gen-exec: which of them each candidate passes. All generated "
        "code runs only in the sandbox. Costs accumulate in ROLLOUTS/signals.json; "
        "docs/verifier-execution.md describes the signals.",
    )
    add_flags(p, SignalsOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qprobe.errors import QProbeError
    from qprobe.sandbox import SandboxConfig
    from qprobe.tasks import get_task
    from qprobe.tasks.code import CodeTask
    from qprobe.verifier import gentests, signals

    o = from_args(SignalsOptions, args)
    if not (o.exec or o.fuzz or o.gen_tests or o.gen_exec):
        raise QProbeError("signals: choose at least one of --exec, --fuzz, --gen-tests, --gen-exec")
    if o.gen_tests and not o.model:
        raise QProbeError("signals: --gen-tests needs --model (the model that writes the tests)")
    model = None
    out = {}
    for folder in o.rollouts:
        res = {}
        for flag, stage in ((o.exec, signals.fill_exec), (o.fuzz, signals.fill_fuzz)):
            if not flag:
                continue
            task = get_task(o.task, data=o.data,
                            sandbox=SandboxConfig(timeout=o.timeout, workers=o.workers))
            if not isinstance(task, CodeTask):
                raise QProbeError(f"signals: task {task.name!r} is not a code task")
            try:
                res[stage.__name__.removeprefix("fill_")] = stage(
                    folder, task, limit=o.limit, chunk=o.chunk, per_step=o.per_step)
            finally:
                task.close()
        if o.gen_tests:
            if model is None:
                from qprobe.backends.registry import load_model

                model = load_model(o.model, device=o.device, chat=False, features=False)
            task = get_task(o.task, data=o.data)
            cfg = gentests.GenTestsConfig(samples=o.samples, max_new_tokens=o.max_new_tokens,
                                          temperature=o.temperature, max_tests=o.max_tests)
            res["gen_tests"] = gentests.sample_tests(folder, task, model, cfg, limit=o.limit,
                                                     batch_prompts=o.batch_prompts,
                                                     say=signals._say)
        if o.gen_exec:
            task = get_task(o.task, data=o.data,
                            sandbox=SandboxConfig(timeout=o.gen_timeout, workers=o.workers))
            try:
                res["gen_exec"] = signals.fill_gen_exec(folder, task, limit=o.limit,
                                                        chunk=o.chunk, per_step=o.per_step)
            finally:
                task.close()
        out[folder] = res
    print(json.dumps(out), file=sys.stderr)
    return 0
