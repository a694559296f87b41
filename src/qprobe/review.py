"""Reviewer likelihood (Coder-Reviewer reranking, Zhang et al., ICML 2023): log p(instruction | program).

The coder likelihood log p(program | instruction) is what sampling and `qprobe embed` already
store (`logprob_sum`). The reviewer turns the prompt around: the candidate program comes first,
then a comment asking for its docstring, then the instruction the coder saw, and only the
instruction's tokens are scored. A program that does something else than asked makes the
instruction unlikely, whatever its own likelihood. docs/verifier.md ("Reviewer likelihood")
shows the prompts.

Per task (`REVIEW_FORMATS`, keyed by the rollouts' task name) a `ReviewFormat` parses a prompt
once and gives the instruction, split in two scored parts, `text` (the description) and `rest`
(the shown test or examples), and per candidate the unscored `context`. The parts are tokenised
on their own and concatenated, so every candidate of a prompt is scored on the very same
instruction tokens and the sums are comparable within a prompt.

`qprobe review ROLLOUTS` stores, beside `qprobe embed`'s files (format in docs/rollouts.md):

    embedded/reviewer.json                 {"format", "model", "task", "shards": {id: cost}}
    embedded/reviewer-<shard>.parquet      prompt_id, sample_idx, reviewer_sum, reviewer_tokens,
                                           reviewer_text_sum, reviewer_text_tokens,
                                           context_tokens, joint_match

A shard is done when its parquet file exists (written atomically), so a killed run resumes. A
local model (`HFReviewer`) runs each prompt's distinct programs as one right-padded batch and
computes logits only at the instruction's positions; an OpenAI-compatible server
(`ServerReviewer`) is asked for prompt log-probabilities (`echo`).
"""

from __future__ import annotations

import ast
import json
import re
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write, atomic_write_json
from qprobe.review_config import ReviewConfig  # noqa: F401  (re-exported: the command's flags)
from qprobe.rollouts import EMBED_DIR, REVIEW_FILE, REVIEW_META, shard_ids

FORMAT = "coder-reviewer/1"  # changes when a prompt below changes (stored files are refused then)
COMMENT = "# write the docstring for the above function\n"  # the paper's zero-shot request


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Instruction:
    """The scored part of a reviewer prompt: `text` then `rest` (each may be empty)."""

    text: str
    rest: str


class ReviewFormat(ABC):
    """One task's reviewer prompt, parsed from one stored prompt."""

    instruction: Instruction

    @abstractmethod
    def __init__(self, prompt: str) -> None: ...

    @abstractmethod
    def context(self, completion: str) -> str:
        """The unscored part for one candidate: its program, then the request for a docstring;
        ends with a newline so that the instruction starts a new pre-token."""


def _ask(program: str) -> str:
    return (program.rstrip() + "\n\n" + COMMENT) if program.strip() else COMMENT


class MBPPReview(ReviewFormat):
    """MBPP's prompt is only the docstring '\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n' (after
    any few-shot examples); the program is the completion. Instruction: that docstring verbatim
    (without its final newline), `text` = the opening quotes and the description, `rest` = the
    shown test and the closing quotes."""

    def __init__(self, prompt: str) -> None:
        end = len(prompt) - 4
        start = prompt.rfind('"""\n', 0, end)
        if not prompt.endswith('"""\n') or start < 0:
            raise QProbeError(f"reviewer (mbpp): prompt does not end with a docstring: {prompt[-80:]!r}")
        inner = prompt[start + 4 : end]  # '{text}\n{test}\n'
        lines = inner.splitlines(keepends=True)
        if lines and lines[-1].startswith("assert "):
            self.instruction = Instruction('"""\n' + "".join(lines[:-1]), lines[-1] + '"""')
        else:
            self.instruction = Instruction('"""\n' + inner + '"""', "")

    def context(self, completion: str) -> str:
        return _ask(completion)


_EXAMPLE = re.compile(r"^(>>>|(for )?examples?\b|e\.g\.)", re.I)


class HumanEvalReview(ReviewFormat):
    """HumanEval's prompt is code (imports, helpers) ending in the entry point's signature and
    docstring; the program is the prompt without that docstring, plus the completion. As the
    paper's zero-shot reviewer: the program, the request, the signature again, then the
    docstring verbatim (its lines with their indentation and quotes; lines between the signature
    and the docstring, such as HumanEval/115's `import math`, go with the signature). `text` = its lines before
    the first example line (`>>>`, "Example", "For example", "e.g.", or a line calling the
    function), `rest` = the lines from there on."""

    def __init__(self, prompt: str) -> None:
        try:
            tree = ast.parse(prompt + "    pass\n")
        except SyntaxError as e:
            raise QProbeError(f"reviewer (humaneval): prompt does not parse ({e.msg})") from None
        defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        fn = defs[-1] if defs else None
        # its docstring: the first statement that is a string (HumanEval/115 imports first)
        doc = next((st for st in (fn.body if fn is not None else []) if isinstance(st, ast.Expr)
                    and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)), None)
        if doc is None:
            raise QProbeError("reviewer (humaneval): the prompt's last function has no docstring")
        lines = prompt.splitlines(keepends=True)
        first, last = doc.lineno - 1, doc.end_lineno or doc.lineno  # 0-based start, end exclusive
        if lines[first][: doc.col_offset].strip() or lines[last - 1][doc.end_col_offset or 0:].strip():
            raise QProbeError("reviewer (humaneval): the docstring does not stand on its own lines")
        top = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
        self.pre = "".join(lines[:top])
        self.header = "".join(lines[top:first])
        self.post = "".join(lines[last:])
        doc_lines = lines[first:last]
        name = fn.name + "("
        cut = next((i for i, ln in enumerate(doc_lines) if i > 0 and
                    (_EXAMPLE.match(ln.strip()) or ln.strip().startswith(name))), len(doc_lines))
        text, rest = "".join(doc_lines[:cut]), "".join(doc_lines[cut:])
        if rest:
            rest = rest.rstrip("\n")
        else:
            text = text.rstrip("\n")
        self.instruction = Instruction(text, rest)

    def context(self, completion: str) -> str:
        return _ask(self.pre + self.header + self.post + completion) + self.header


REVIEW_FORMATS: dict[str, type[ReviewFormat]] = {"mbpp": MBPPReview, "humaneval": HumanEvalReview}


def review_format(task: str, prompt: str) -> ReviewFormat:
    """The reviewer prompt of one stored prompt of `task`."""
    if task not in REVIEW_FORMATS:
        raise QProbeError(f"reviewer: no reviewer prompt for task {task!r}; known: "
                          f"{sorted(REVIEW_FORMATS)}")
    return REVIEW_FORMATS[task](prompt)


# ----------------------------------------------------------------------------- scorers


@dataclass
class Scores:
    """Reviewer scores of n programs of one prompt."""

    total: np.ndarray  # [n] float64, log p(text + rest | context)
    text: np.ndarray  # [n] float64, log p(text | context)
    total_tokens: np.ndarray  # [n] int64
    text_tokens: np.ndarray  # [n] int64
    context_tokens: np.ndarray  # [n] int64
    joint_match: np.ndarray  # [n] bool: tokenising the whole prompt gives the same tokens


class Reviewer(ABC):
    """Scores the instruction after each of several contexts."""

    identity: str
    tokens = 0  # model tokens run so far (context + instruction), for the cost record

    @abstractmethod
    def score(self, contexts: list[str], instruction: Instruction) -> Scores: ...


class HFReviewer(Reviewer):
    """A local transformers causal LM: right-padded rows (padding after a row cannot change it
    under causal attention), rows of similar length batched, the LM head run only at the
    positions that predict an instruction token."""

    def __init__(self, model, tokenizer, identity: str, head_chunk: int = 512) -> None:
        from qprobe.backends.hf.tokenizer import PromptTokenizer, pad_id

        self.model, self.identity, self.head_chunk = model, identity, head_chunk
        self.tok = PromptTokenizer(tokenizer, False)
        self.pad = pad_id(tokenizer)
        self.dev = next(model.parameters()).device
        self._instr: tuple[Instruction, list[int], list[int]] | None = None

    def _instruction_ids(self, ins: Instruction) -> tuple[list[int], list[int]]:
        if self._instr is None or self._instr[0] != ins:
            text = self.tok.completion_ids(ins.text) if ins.text else []
            rest = self.tok.completion_ids(ins.rest) if ins.rest else []
            self._instr = (ins, text, rest)
        return self._instr[1], self._instr[2]

    def score(self, contexts: list[str], instruction: Instruction) -> Scores:
        import torch

        from qprobe.backends.hf.encode import length_chunks

        text_ids, rest_ids = self._instruction_ids(instruction)
        ins = text_ids + rest_ids
        m, n = len(ins), len(contexts)
        ctx = [self.tok.prompt_ids(c) for c in contexts]
        if any(not c for c in ctx):
            raise QProbeError("reviewer: a context tokenises to nothing")
        joint = np.array([self.tok.prompt_ids(c + instruction.text + instruction.rest) == c_ids + ins
                          for c, c_ids in zip(contexts, ctx)])
        lens = np.array([len(c) + m for c in ctx], dtype=np.int64)  # [n]
        per_tok = np.zeros((n, m))  # [n, m] log p of each instruction token
        if m:
            with torch.no_grad():
                for rows in length_chunks(lens):
                    per_tok[rows] = self._rows([ctx[i] for i in rows], ins)
        self.tokens += int(lens.sum())
        nt = len(text_ids)
        return Scores(total=per_tok.sum(1), text=per_tok[:, :nt].sum(1),
                      total_tokens=np.full(n, m, dtype=np.int64),
                      text_tokens=np.full(n, nt, dtype=np.int64),
                      context_tokens=np.array([len(c) for c in ctx], dtype=np.int64),
                      joint_match=joint)

    def _rows(self, ctx: list[list[int]], ins: list[int]) -> np.ndarray:
        """[rows, m] log-probabilities of the instruction tokens after each context."""
        import torch

        n, m = len(ctx), len(ins)
        clen = torch.tensor([len(c) for c in ctx])  # [n]
        longest = int(clen.max()) + m
        ids = torch.full((n, longest), self.pad, dtype=torch.long)  # right padded [n, L]
        for a, c in enumerate(ctx):
            ids[a, : len(c) + m] = torch.tensor(c + ins, dtype=torch.long)
        h = self.model.model(input_ids=ids.to(self.dev), use_cache=False).last_hidden_state  # [n, L, D]
        # Instruction token j of row a sits at clen[a] + j and is predicted at clen[a] - 1 + j.
        pos = (clen[:, None] - 1 + torch.arange(m)[None, :]).to(self.dev)  # [n, m]
        hs = h[torch.arange(n, device=self.dev)[:, None], pos].reshape(n * m, -1)  # [n*m, D]
        target = torch.tensor(ins, device=self.dev).repeat(n)  # [n*m]
        head = self.model.get_output_embeddings()
        out = torch.empty(n * m, dtype=torch.float64)
        for s in range(0, n * m, self.head_chunk):
            logits = head(hs[s : s + self.head_chunk]).float()  # [c, V]
            lp = logits.gather(1, target[s : s + self.head_chunk, None]).squeeze(1) - torch.logsumexp(logits, 1)
            out[s : s + self.head_chunk] = lp.double().cpu()
        return out.reshape(n, m).numpy()


class ServerReviewer(Reviewer):
    """An OpenAI-compatible server's prompt log-probabilities: POST /v1/completions with the
    whole reviewer prompt, `echo=true, max_tokens=0, logprobs=1` (vLLM's and OpenAI's legacy
    completions API; max_tokens=1 when 0 is refused, the generated token then left out). A
    token belongs to the instruction when its `text_offset` is at or past the context's length
    (character offsets, as the API gives them). The server tokenises the whole prompt, so a
    token could straddle the context/instruction boundary; the newline the context ends with
    keeps the boundary a token boundary for BPE tokenisers that split before words."""

    def __init__(self, base_url: str, model: str | None = None, concurrency: int = 4,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 5) -> None:
        from qprobe.backends.http import HttpClient

        self.http = HttpClient(base_url, api_key_env, timeout, max_retries, 0.5, 60.0)
        self.concurrency = concurrency
        self._model = model
        self._max_tokens = 0
        self.identity = model or ""

    @property
    def model(self) -> str:
        if self._model is None:
            listing = self.http.request("GET", "/models")
            data = listing.get("data") if isinstance(listing, dict) else None
            if not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise QProbeError(f"GET {self.http.base_url}/models listed no model; pass --model")
            self._model = str(data[0]["id"])
            self.identity = self._model
        return self._model

    def _one(self, context: str, ins: Instruction) -> tuple[float, float, int, int, int]:
        from qprobe.backends.http import APIStatusError

        prompt = context + ins.text + ins.rest
        asked = self._max_tokens
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1,
                "temperature": 1.0, "max_tokens": asked}
        try:
            out = self.http.request("POST", "/completions", body)
        except APIStatusError as e:
            if e.status not in (400, 422) or asked:
                raise
            self._max_tokens = 1  # some servers want at least one new token
            return self._one(context, ins)
        return echo_scores(out, len(context), len(context) + len(ins.text), len(prompt),
                           where=f"POST {self.http.base_url}/completions")

    def score(self, contexts: list[str], instruction: Instruction) -> Scores:
        _ = self.model
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            got = list(pool.map(lambda c: self._one(c, instruction), contexts))
        total, text, nt, nx, all_ = (np.array([g[i] for g in got]) for i in range(5))
        self.tokens += int(all_.sum())
        return Scores(total=total.astype(np.float64), text=text.astype(np.float64),
                      total_tokens=nt.astype(np.int64), text_tokens=nx.astype(np.int64),
                      context_tokens=(all_ - nt).astype(np.int64),
                      joint_match=np.ones(len(contexts), dtype=bool))


def echo_scores(out: Any, ctx_end: int, text_end: int, prompt_end: int, where: str
                ) -> tuple[float, float, int, int, int]:
    """(instruction sum, text sum, instruction tokens, text tokens, prompt tokens) from an echo
    answer:
    `choices[0].logprobs` = {"tokens", "token_logprobs", "text_offset"} (OpenAI / vLLM shape;
    offsets rebuilt from the token strings when absent)."""
    try:
        lp = out["choices"][0]["logprobs"]
        toks, vals = list(lp["tokens"]), list(lp["token_logprobs"])
    except (KeyError, IndexError, TypeError):
        raise QProbeError(f"{where}: the answer has no prompt log-probabilities (does the server "
                          "support echo with logprobs?)") from None
    offs = lp.get("text_offset")
    if not isinstance(offs, list) or len(offs) != len(toks):
        offs, pos = [], 0
        for t in toks:
            offs.append(pos)
            pos += len(str(t))
    total = text = 0.0
    n_all = n_text = n_prompt = 0
    for off, v in zip(offs, vals):
        n_prompt += off < prompt_end
        if off < ctx_end or off >= prompt_end:
            continue
        if v is None:
            raise QProbeError(f"{where}: no log-probability for an instruction token")
        total += float(v)
        n_all += 1
        if off < text_end:
            text += float(v)
            n_text += 1
    if n_all == 0 and prompt_end > ctx_end:
        raise QProbeError(f"{where}: no echoed token falls in the instruction")
    return total, text, n_all, n_text, n_prompt


# ----------------------------------------------------------------------------- the command


def _prepare(out_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The stored reviewer.json (made if absent); refuses files of another model or format."""
    f = out_dir / REVIEW_META
    old: dict[str, Any] = {}
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError as e:
            raise QProbeError(f"{f}: not valid JSON ({e})") from None
    have = any(out_dir.glob(REVIEW_FILE.format("*")))
    if have and {k: old.get(k) for k in info} != info:
        raise QProbeError(f"reviewer: {out_dir} holds reviewer scores of {old.get('model')!r} "
                          f"({old.get('format')}, task {old.get('task')}); this run is "
                          f"{info['model']!r} ({info['format']}, task {info['task']}): delete "
                          f"{out_dir}/{REVIEW_FILE.format('*')} to redo")
    shards = old.get("shards", {}) if have else {}
    meta = {**info, "shards": shards, "totals": _totals(shards)}
    atomic_write_json(f, meta)
    return meta


def _totals(shards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cost columns over the shards timed so far."""
    keys = ("rows", "unique_rows", "prompts", "tokens", "seconds")
    s = {k: sum(v.get(k) or 0 for v in shards.values()) for k in keys}
    if not s["rows"]:
        return s
    return {**s, "tokens_per_s": round(s["tokens"] / s["seconds"], 1) if s["seconds"] else None,
            "seconds_per_prompt": round(s["seconds"] / s["prompts"], 3),
            "model_tokens_per_candidate": round(s["tokens"] / s["rows"], 1),
            "duplicate_share": round(1 - s["unique_rows"] / s["rows"], 3)}


def review_shard(t: pa.Table, task: str, reviewer: Reviewer) -> tuple[pa.Table, dict[str, int]]:
    """Reviewer scores of one samples table; distinct programs of a prompt are scored once."""
    n = t.num_rows
    prompts, comps = t.column("prompt").to_pylist(), t.column("completion").to_pylist()
    cols = {k: np.zeros(n, dtype=d) for k, d in (
        ("reviewer_sum", np.float64), ("reviewer_tokens", np.int32), ("reviewer_text_sum", np.float64),
        ("reviewer_text_tokens", np.int32), ("context_tokens", np.int32), ("joint_match", bool))}
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    unique = 0
    for p, rows in groups.items():
        fmt = review_format(task, p)
        ctxs: dict[str, list[int]] = {}
        for i in rows:
            ctxs.setdefault(fmt.context(comps[i]), []).append(i)
        order = list(ctxs)
        unique += len(order)
        s = reviewer.score(order, fmt.instruction)
        for a, c in enumerate(order):
            idx = ctxs[c]
            cols["reviewer_sum"][idx] = s.total[a]
            cols["reviewer_tokens"][idx] = s.total_tokens[a]
            cols["reviewer_text_sum"][idx] = s.text[a]
            cols["reviewer_text_tokens"][idx] = s.text_tokens[a]
            cols["context_tokens"][idx] = s.context_tokens[a]
            cols["joint_match"][idx] = s.joint_match[a]
    table = pa.table({"prompt_id": t.column("prompt_id"), "sample_idx": t.column("sample_idx"),
                      **{k: pa.array(v) for k, v in cols.items()}})
    return table, {"rows": n, "unique_rows": unique, "prompts": len(groups),
                   "joint_mismatch": int((~cols["joint_match"]).sum())}


def load_reviewer(cfg: ReviewConfig) -> Reviewer:
    """A server reviewer for a URL, else the local model (default: the folder's own)."""
    from qprobe.backends.registry import resolve
    from qprobe.embed import model_for

    if cfg.model is not None and resolve(cfg.model).key == "openai":
        return ServerReviewer(cfg.model, concurrency=cfg.concurrency)
    from qprobe.backends.hf import load_hf

    name = model_for(cfg)  # type: ignore[arg-type]  # reads .model and .rollouts only
    hf, tok, identity = load_hf(name, device=cfg.device)
    return HFReviewer(hf, tok, identity)


def review_rollouts(cfg: ReviewConfig, reviewer: Reviewer | None = None, say=print) -> dict[str, Any]:
    """Reviewer scores for every shard of a rollouts folder that has none yet; returns the
    summary (this run's shards, and the cost totals over all timed shards)."""
    from qprobe.rollouts import read_meta

    path = Path(cfg.rollouts)
    meta = read_meta(path)
    task = cfg.task or str(meta.get("task") or "")
    if task not in REVIEW_FORMATS:
        raise QProbeError(f"reviewer: {path} is task {task!r}; reviewer prompts exist for "
                          f"{sorted(REVIEW_FORMATS)} (pass --task)")
    if meta.get("chat"):
        raise QProbeError(f"reviewer: {path} was sampled through a chat template; the reviewer "
                          "prompt is for completion-mode models")
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    if reviewer is None:
        say(f"review: loading {cfg.model or 'the folder model'}")
        reviewer = load_reviewer(cfg)
    if isinstance(reviewer, ServerReviewer):
        _ = reviewer.model
    out_dir = path / EMBED_DIR
    out_dir.mkdir(exist_ok=True)
    stats = _prepare(out_dir, {"format": FORMAT, "model": reviewer.identity, "task": task})
    shards = shard_ids(path)[: cfg.limit_shards]
    todo = [s for s in shards if not (out_dir / REVIEW_FILE.format(s)).is_file()]
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"review {path.name}", unit="shard")
    t_run, tok_run, rows_run = time.perf_counter(), 0, 0
    for sid in todo:
        t0, tok0 = time.perf_counter(), reviewer.tokens
        t = pq.read_table(path / f"samples-{sid}.parquet",
                          columns=["prompt_id", "sample_idx", "prompt", "completion"])
        table, info = review_shard(t, task, reviewer)
        atomic_write(out_dir / REVIEW_FILE.format(sid), lambda f, tb=table: pq.write_table(tb, f))
        secs = time.perf_counter() - t0
        info.update(tokens=reviewer.tokens - tok0, seconds=round(secs, 2),
                    threads=cfg.threads, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        stats["shards"][sid] = info
        stats["totals"] = _totals(stats["shards"])
        atomic_write_json(out_dir / REVIEW_META, stats)
        tok_run += info["tokens"]
        rows_run += info["rows"]
        rate = f"{tok_run / max(time.perf_counter() - t_run, 1e-9):.0f}"
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=rate)
        else:
            say(f"review {path.name}: shard {sid} done ({info['rows']} rows, {rate} tokens/s)")
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t_run
    summary = {"folder": str(path), "shards": len(shards), "new_shards": len(todo), "rows": rows_run,
               "tokens": tok_run, "seconds": round(secs, 1), "totals": stats.get("totals", {})}
    say(f"review: {path}: {len(todo)} new shard(s), {rows_run} rows, {tok_run} model tokens "
        f"in {secs:.0f}s")
    return summary
