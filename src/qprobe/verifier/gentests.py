"""Model-written tests, as CodeT (Chen et al., 2022, arXiv 2207.10397) samples them.

The model continues the task prompt (a HumanEval prompt gets a `pass` body first) with

    # check the correctness of <entry point>
    <the assert the prompt shows (MBPP)>
    assert <entry point>(

(without the shown assert in that place the model nearly always copies it from the prompt, and
the copy is dropped).

and each sample's lines that are single `assert` statements calling the entry point (parsed with
`ast` here, never run here) become tests, deduplicated in order, without the tests the prompt
itself shows (those are `visible_status`'s), at most `max_tests` per prompt. They are stored
beside the rollouts:

    <rollouts>/gen_tests/meta.json           model, prompt format, sampling (a resume must match)
    <rollouts>/gen_tests/tests-00000.jsonl   one row per prompt: prompt_id, entry_point, tests,
                                             samples (raw text), tokens, seconds

one file per batch of prompts, each written whole and claimed under a fresh name, so a stopped
run keeps every finished batch and a resumed one samples only prompts without a row.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write_json, claim_new
from qprobe.verifier.calls import PARSE_ERRORS, parse_asserts, shown_inputs

DIR = "gen_tests"
# a blank line ends a block of asserts: the model then tends to write prose or code, not tests
STOP = ["\n\n", "<|endoftext|>", "\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n```", '\n"""']
PROMPT_FORMAT = ("{prompt}[    pass\\n if the prompt ends in a def]\\n# check the correctness of {ep}"
                 "\\n[the shown assert\\n (MBPP)]assert {ep}(")
_FILE = re.compile(r"^tests-(\d{5,})\.jsonl$")


@dataclass
class GenTestsConfig:
    """How tests are sampled (CodeT's prompt; fewer, shorter samples than its 100 x 300 tokens)."""

    samples: int = field(default=8, metadata={"help": "model samples per prompt"})
    max_new_tokens: int = field(default=96, metadata={"help": "tokens per sample"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_tests: int = field(default=10, metadata={"help": "tests kept per prompt (in order)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def writing_prompt(row: dict) -> tuple[str, str] | None:
    """(entry point, the text the model continues) for a task row; None when the row names no
    function to test."""
    ep, _ = shown_inputs(row)
    if not ep:
        return None
    body = "    pass\n" if row.get("entry_point") else ""  # a signature + docstring prompt
    shown = "".join(a.strip() + "\n" for a in (row.get("test_list") or [])[:1])
    return ep, row["prompt"] + body + f"\n# check the correctness of {ep}\n{shown}assert {ep}("


def _norm(src: str) -> str:
    try:
        return ast.dump(ast.parse(src.strip()))
    except PARSE_ERRORS:
        return src.strip()


def shown_asserts(row: dict) -> set[str]:
    """The tests the prompt shows, normalised (`ast.dump`), to keep out of the written ones."""
    from qprobe.tasks.humaneval import _prose_examples

    shown = list(row.get("test_list") or [])[:1]
    if row.get("entry_point"):
        shown = [f"assert {a}" for a in _prose_examples(row["prompt"], row["entry_point"])]
    return {_norm(a) for a in shown}


def asserts_from_samples(texts: list[str], ep: str, row: dict, max_tests: int) -> list[str]:
    """The tests in the model's continuations of `writing_prompt` (each text follows `assert ep(`)."""
    shown = shown_asserts(row)
    out: list[str] = []
    for text in texts:
        for a in parse_asserts(f"assert {ep}(" + text, ep):
            if a not in out and _norm(a) not in shown:
                out.append(a)
    return out[:max_tests]


def read_tests(path: str | os.PathLike) -> dict[str, dict]:
    """prompt_id -> stored row of a rollouts folder's model-written tests ({} when none)."""
    d = Path(path) / DIR
    out: dict[str, dict] = {}
    if not d.is_dir():
        return out
    for f in sorted(p for p in d.iterdir() if _FILE.match(p.name)):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                out.setdefault(str(row["prompt_id"]), row)
            except (ValueError, KeyError, TypeError):
                raise QProbeError(f"{f}:{n}: not a model-written tests row") from None
    return out


def _check_meta(d: Path, meta: dict) -> None:
    f = d / "meta.json"
    if f.is_file():
        stored = json.loads(f.read_text())
        if stored != meta:
            diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
            raise QProbeError(f"{d}: tests were written with other settings ({', '.join(diff)}); "
                              "delete the folder to write them again")
    else:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, meta)


def _append(d: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    nums = [int(m.group(1)) for p in d.iterdir() if (m := _FILE.match(p.name))]
    i = max(nums) + 1 if nums else 0
    while not claim_new(d / f"tests-{i:05d}.jsonl", lambda f: f.write(text)):
        i += 1
    return d / f"tests-{i:05d}.jsonl"


def sample_tests(path: str | os.PathLike, task: Any, model: Any, cfg: GenTestsConfig, *,
                 limit: int | None = None, batch_prompts: int = 4,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write model-written tests for every prompt of the folder (first `limit`) without them."""
    from qprobe.backends.base import SamplingParams
    from qprobe.rollouts import Rollouts
    from qprobe.verifier.store import add_cost

    path = Path(path)
    d = path / DIR
    _check_meta(d, {"model": model.name, "prompt": PROMPT_FORMAT, "stop": STOP, **asdict(cfg)})
    ids = list(dict.fromkeys(Rollouts(path).prompt_ids.tolist()))[:limit]
    done = read_tests(path)
    todo = [pid for pid in ids if pid not in done]
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, stop=STOP, seed=cfg.seed)
    say(f"gen-tests: {len(todo)} of {len(ids)} prompts to write tests for in {path}")
    tokens_all = 0
    for start in range(0, len(todo), batch_prompts):
        t0 = time.monotonic()
        rows = [task.row(pid) for pid in todo[start:start + batch_prompts]]
        made = [(row, writing_prompt(row)) for row in rows]
        asked = [(row, tp) for row, tp in made if tp is not None]
        samples = model.sample([tp[1] for _, tp in asked], cfg.samples, params) if asked else []
        secs = time.monotonic() - t0
        out = []
        by_id = {row["id"]: s for (row, _), s in zip(asked, samples)}
        for row, tp in made:
            ss = by_id.get(row["id"], [])
            texts = [s.text for s in ss]
            tokens = sum(int(s.num_tokens or len(s.token_ids)) for s in ss)
            tests = asserts_from_samples(texts, tp[0], row, cfg.max_tests) if tp else []
            out.append({"prompt_id": row["id"], "entry_point": tp[0] if tp else None,
                        "tests": tests, "samples": texts, "tokens": tokens,
                        "seconds": round(secs / len(rows), 3)})
        _append(d, out)
        n_tok = sum(r["tokens"] for r in out)
        tokens_all += n_tok
        add_cost(path, "gen_tests", seconds=secs, prompts=len(rows), tokens=n_tok)
        n_tests = sum(len(r["tests"]) for r in out)
        say(f"gen-tests: {min(start + batch_prompts, len(todo))}/{len(todo)} prompts, "
            f"{n_tests} tests, {n_tok} tokens in {secs:.1f} s")
    return {"prompts": len(todo), "tokens": tokens_all}
