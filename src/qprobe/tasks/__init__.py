"""Tasks: prompts, stop sequences and rewards. `get_task(name_or_path)` is the entry point.

`load_task` is what collection uses (a plain JSONL of prompts, without rewards, is a task too).
Registered names come from `register(name, factory, description)`; a factory takes keyword
arguments such as `data` (a local data path) and `sandbox` (a SandboxConfig) and ignores those it
does not know. `--task` also takes a .jsonl/.jsonl.gz path or `module:function`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from qprobe.errors import QProbeError
from qprobe.tasks.base import Score, Task, cache_dir, data_roots, find_data

_REGISTRY: dict[str, tuple[Callable[..., Task], str]] = {}


def register(name: str, factory: Callable[..., Task], description: str = "") -> None:
    """Make `get_task(name)` build `factory(**kwargs)`. Later registrations replace earlier."""
    _REGISTRY[name] = (factory, description)


def list_tasks() -> list[str]:
    """Registered task names, in registration order."""
    return list(_REGISTRY)


def describe(name: str) -> str:
    return _REGISTRY[name][1]


def _call(factory: Callable[..., Task], kwargs: dict) -> Task:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params and v is not None})


def get_task(name_or_path: str, **kwargs) -> Task:
    """A task by registered name, JSONL path, or `module:function` (see qprobe.tasks.custom).

    kwargs (e.g. data=PATH, sandbox=SandboxConfig(...), few_shot=3) go to the task's factory."""
    from qprobe.tasks.custom import load_callable, load_jsonl_task

    if name_or_path in _REGISTRY:
        return _call(_REGISTRY[name_or_path][0], kwargs)
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".gz") or path.is_file():
        if not path.is_file():
            raise QProbeError(f"task file not found: {path}")
        return load_jsonl_task(path, kwargs.get("sandbox"))
    if ":" in name_or_path:
        return load_callable(name_or_path, **kwargs)
    raise QProbeError(
        f"unknown task {name_or_path!r}; known: {', '.join(_REGISTRY)}; or give a .jsonl file "
        "or module:function"
    )


def load_task(name_or_path: str, data: str | None = None) -> Task:
    """The task `qprobe collect --task` names: a registered name (`data`: its local data folder),
    `module:function`, or a plain {id, prompt} JSONL file (rewards left empty)."""
    path = Path(name_or_path)
    if path.suffix in (".jsonl", ".gz") and path.is_file():
        from qprobe.tasks.custom import load_jsonl_task

        return load_jsonl_task(path, plain=True)
    return get_task(name_or_path, data=data)


def _builtin() -> None:
    from qprobe.tasks.gsm8k import GSM8K
    from qprobe.tasks.humaneval import HumanEval
    from qprobe.tasks.mbpp import MBPP
    from qprobe.tasks.preference import HHHarmless

    register("humaneval", HumanEval, HumanEval.description)
    register("mbpp", MBPP, MBPP.description)
    register(
        "gsm8k",
        lambda data=None, few_shot=0: GSM8K(data, "flexible", few_shot),
        GSM8K.description + " (flexible: last number)",
    )
    register(
        "gsm8k-strict",
        lambda data=None, few_shot=0: GSM8K(data, "strict", few_shot),
        GSM8K.description + " (strict: '#### N')",
    )
    from qprobe.tasks.gsm8k_pal import GSM8KPAL  # program-aided GSM8K (issue 27)

    register("gsm8k-pal", GSM8KPAL, GSM8KPAL.description + " (8-shot, as the bigcode harness)")
    register("gsm8k-pal-3shot",  # a third of the prefill: what a 1-2 core CPU run can afford
             lambda data=None, sandbox=None, few_shot=3: GSM8KPAL(data, sandbox, few_shot),
             GSM8KPAL.description + " (3-shot)")
    register("hh-harmless", HHHarmless,
             "Anthropic HH-RLHF harmless-base test file: preference pairs, split by prompt hash")

    from qprobe.tasks.arith import TimesTables  # the demo task (issue 5)

    register("times-tables", TimesTables, TimesTables.description)

    from qprobe.tasks.sentiment import Sentiment  # token-level guidance (issue 15)

    register("sentiment", Sentiment, Sentiment.description)


_builtin()

__all__ = [
    "Score",
    "Task",
    "cache_dir",
    "data_roots",
    "describe",
    "find_data",
    "get_task",
    "list_tasks",
    "load_task",
    "register",
]
