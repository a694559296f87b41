"""Re-featurising stored samples: log-likelihoods and features at several layers, no resampling.

`qprobe embed ROLLOUTS` runs the model once more over the stored (prompt, completion) tokens and
stores, beside the original features:
- each sample's log-likelihood under the model's own distribution (temperature 1, no top-p
  truncation): `logprob_sum` over the completion tokens and `logprob_tokens`, their count;
- named feature sets, one per (layer, position), e.g. `L15-mean`, so that the feature a probe
  reads can be chosen by cross-validation without sampling again.

Cost: one forward pass per prompt group. The prompt is run once and its KV cache is shared by the
group's k completions, which then run as one batch [k, longest completion]; logits are computed
only at completion positions (`backends.hf.encode.GroupEncoder`). Sampling decodes token by
token; this is a prefill, far cheaper.

Tokens: new rollouts store the sampled `token_ids`; for older ones the completion text is
re-tokenised and the count compared with the stored `num_tokens` (`retokenised_match`).

On disk (inside the rollouts folder; format in docs/rollouts.md):

    embedded/sets.json                    {"model", "chat", "sets": {name: feature_spec}}
    embedded/<set>/features-<shard>.npy   [rows of samples-<shard>, dim], row-aligned
    embedded/loglik-<shard>.parquet       prompt_id, sample_idx, logprob_sum, logprob_tokens,
                                          retokenised_match, check_max_abs (commit marker)

A shard is done when its loglik file exists (written last, atomically), so a killed run resumes
where it stopped and never leaves a half shard.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qprobe.embed_config import EmbedConfig
from qprobe.errors import QProbeError
from qprobe.features import POSITIONS, FeatureSpec, chat_identity
from qprobe.fileio import atomic_write, atomic_write_json, remove_stale_tmp
from qprobe.rollouts import EMBED_DIR, feature_set_name, shard_ids

if TYPE_CHECKING:  # torch is imported when a model runs
    from qprobe.backends.hf.encode import GroupEncoder


def default_layers(n_layers: int, collection_layer: int) -> list[int]:
    """Depths worth comparing: about 55% of the depth, the collection layer, and the last block."""
    picks = {round(n_layers * 0.55) - 1, n_layers - 1, collection_layer}
    return sorted(i for i in picks if 0 <= i < n_layers)




def read_sets(path: str | Path) -> dict[str, Any]:
    """The embedded/sets.json of a rollouts folder ({} when it has none)."""
    f = Path(path) / EMBED_DIR / "sets.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise QProbeError(f"{f}: not valid JSON ({e})") from None


def embed_rollouts(cfg: EmbedConfig, model_bundle: tuple | None = None, say=print) -> dict[str, Any]:
    """Re-encode a rollouts folder (resumable); returns a summary dict.

    `model_bundle` = (hf_model, tokenizer, identity) skips loading (tests pass tiny models)."""
    from qprobe.backends.hf.encode import GroupEncoder
    from qprobe.backends.hf.model import load_hf
    from qprobe.backends.hf.tokenizer import PromptTokenizer, pad_id
    from qprobe.rollouts import Rollouts

    path = Path(cfg.rollouts)
    r = Rollouts(path)
    meta = r.meta
    spec = r.feature_spec
    bad = [p for p in cfg.positions if p not in POSITIONS]
    if bad:
        raise QProbeError(f"embed: positions must be among {POSITIONS}, got {bad}")
    if model_bundle is None:
        say(f"embed: loading {model_for(cfg)}")
        model_bundle = load_hf(model_for(cfg), device=cfg.device)
    hf, tokenizer, identity = model_bundle
    chat = bool(meta.get("chat", False))
    tok = PromptTokenizer(tokenizer, chat)
    if spec is not None and spec.model != chat_identity(identity, chat):
        raise QProbeError(f"embed: {path} was collected with {spec.model!r}, this model is "
                          f"{identity!r}; pass --model with the collection's model")
    from qprobe.backends.hf.generic import decoder_blocks

    blocks = decoder_blocks(hf)
    ident = chat_identity(identity, chat)
    compute, sets = _plan_sets(cfg, spec, ident, int(hf.config.hidden_size), len(blocks))
    out_dir = _prepare_dir(path, ident, chat, sets)
    shards = shard_ids(path)[: cfg.limit_shards]
    todo = [s for s in shards if not (out_dir / f"loglik-{s}.parquet").is_file()]
    enc = GroupEncoder(hf, compute, blocks)
    pad = pad_id(tokenizer)
    t0, n_tok, n_rows, mismatched = time.perf_counter(), 0, 0, 0
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"embed {path.name}", unit="shard")
    for sid in todo:
        t = pq.read_table(path / f"samples-{sid}.parquet")
        stored = np.load(path / f"features-{sid}.npy", mmap_mode="r") if spec is not None else None
        res = _encode_shard(t, tok, enc, pad, sets, spec, stored)
        for name, arr in res["features"].items():
            atomic_write(out_dir / name / f"features-{sid}.npy",
                         lambda f, a=arr: np.save(f, np.ascontiguousarray(a, dtype=np.float16)))
        atomic_write(out_dir / f"loglik-{sid}.parquet", lambda f, tb=res["table"]: pq.write_table(tb, f))
        n_tok += res["tokens"]
        n_rows += t.num_rows
        mismatched += res["mismatched"]
        rate = f"{n_tok / (time.perf_counter() - t0):.0f}"
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=rate)
        else:
            say(f"embed {path.name}: shard {sid} done ({n_rows} rows, {rate} tokens/s)")
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    summary = {"shards": len(shards), "new_shards": len(todo), "rows": n_rows, "tokens": n_tok,
               "seconds": round(secs, 1), "tokens_per_s": round(n_tok / secs, 1) if secs else None,
               "retokenised_mismatch": mismatched, "sets": sorted(sets)}
    say(f"embed: {path}: {len(todo)} new shard(s), {n_rows} rows, {n_tok} tokens in {secs:.0f}s"
        + (f", {mismatched} re-tokenised counts differ from num_tokens" if mismatched else ""))
    return summary


def _plan_sets(cfg: EmbedConfig, spec: FeatureSpec | None, ident: str, dim: int, n_layers: int
               ) -> tuple[list[int], dict[str, FeatureSpec]]:
    """(layers to read, including the collection layer for the check; the sets to store)."""
    from qprobe.backends.hf.model import resolve_layer

    coll_layer = spec.layer if spec is not None else None
    if cfg.layers:
        layers = [resolve_layer(x, n_layers) for x in cfg.layers]
    else:
        layers = default_layers(n_layers, coll_layer if coll_layer is not None
                                else resolve_layer(None, n_layers))
    compute = sorted(set(layers) | ({coll_layer} if coll_layer is not None else set()))
    sets = {}
    for layer in layers:
        for pos in cfg.positions:
            if cfg.skip_stored and spec is not None and layer == spec.layer and pos == spec.position:
                continue
            fs = FeatureSpec(model=ident, layer=layer, position=pos, dim=dim)
            sets[feature_set_name(fs)] = fs
    return compute, sets


def _prepare_dir(path: Path, ident: str, chat: bool, sets: dict[str, FeatureSpec]) -> Path:
    """embedded/ with its sets.json; refuses one made with another model or other sets."""
    out_dir = path / EMBED_DIR
    out_dir.mkdir(exist_ok=True)
    remove_stale_tmp(out_dir)
    old = read_sets(path)
    if old and (old.get("model") != ident or any(
            k in old.get("sets", {}) and old["sets"][k] != v.to_dict() for k, v in sets.items())):
        raise QProbeError(f"embed: {out_dir} holds sets of another model or spec; delete it to redo")
    if old and set(old.get("sets", {})) != set(sets) and any(out_dir.glob("loglik-*.parquet")):
        raise QProbeError(f"embed: {out_dir} was made with sets {sorted(old.get('sets', {}))}, "
                          f"now {sorted(sets)}; use the same --layers/--positions or delete it")
    atomic_write_json(out_dir / "sets.json", {"model": ident, "chat": chat,
                                              "sets": {k: v.to_dict() for k, v in sets.items()}})
    for name in sets:
        (out_dir / name).mkdir(exist_ok=True)
    return out_dir


def model_for(cfg: EmbedConfig) -> str:
    """The model to load for a folder: --model, else its recorded model (GGUF file names of the
    known models map to their aliases)."""
    from qprobe import models
    from qprobe.rollouts import read_meta

    if cfg.model:
        return cfg.model
    name = str(read_meta(Path(cfg.rollouts)).get("model") or "")
    for alias, fname in (("qwen2.5-coder-0.5b", models.QWEN_CODER_FILE),
                         ("default", models.DEFAULT_MODEL_FILE)):
        if name == fname:
            return alias
    if not name:
        raise QProbeError("embed: the folder's meta.json names no model; pass --model")
    return name


def _retokenise(tok, text: str, kept: int | None) -> list[int]:
    """Token ids of a stored completion that has no `token_ids` column.

    Sampling keeps only the tokens wholly inside the text: when a token straddled a stop string
    (")\n\n" before "\n#"), its first part (")\n") stays in the text but not among the
    `num_tokens` kept tokens. Re-tokenising the text then gives more tokens than were kept, so the
    first `num_tokens` are taken (check_rel_err, the recomputed stored feature, confirms it). Fewer
    tokens than kept means the model sampled a non-canonical split, which text cannot recover."""
    ids = tok.completion_ids(text)
    if kept is not None and len(ids) > int(kept) >= 0:
        return ids[: int(kept)]
    return ids


def _encode_shard(t: pa.Table, tok, enc: GroupEncoder, pad: int, sets: dict[str, FeatureSpec],
                  spec: FeatureSpec | None, stored: np.ndarray | None) -> dict[str, Any]:
    n = t.num_rows
    prompts = t.column("prompt").to_pylist()
    comps = t.column("completion").to_pylist()
    have_ids = "token_ids" in t.column_names
    ids = t.column("token_ids").to_pylist() if have_ids else [None] * n
    num = t.column("num_tokens").to_pylist() if "num_tokens" in t.column_names else [None] * n
    toks: list[list[int]] = []
    match: list[bool | None] = []
    for i in range(n):
        if ids[i] is not None:
            toks.append(list(ids[i]))
            match.append(None)
        else:
            toks.append(_retokenise(tok, comps[i], num[i]))
            match.append(None if num[i] is None else len(toks[-1]) == int(num[i]))
    dim = next(iter(sets.values())).dim if sets else (spec.dim if spec else 0)
    feats = {name: np.zeros((n, dim), dtype=np.float32) for name in sets}
    lp_sum = np.zeros(n)
    lp_tok = np.zeros(n, dtype=np.int64)
    check = np.full(n, np.nan)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for p, rows in groups.items():
        s, c, f = enc.encode(tok.prompt_ids(p), [toks[i] for i in rows], pad)
        lp_sum[rows], lp_tok[rows] = s, c
        for name, fs in sets.items():
            feats[name][rows] = f[fs.layer][fs.position]
        if stored is not None and spec is not None:
            mine = f[spec.layer][spec.position]  # [len(rows), D]
            ref = np.asarray(stored[rows], dtype=np.float32)
            check[rows] = np.abs(mine - ref).max(1) / np.maximum(np.abs(ref).max(1), 1e-6)
    table = pa.table({
        "prompt_id": t.column("prompt_id"), "sample_idx": t.column("sample_idx"),
        "logprob_sum": pa.array(lp_sum, pa.float64()),
        "logprob_tokens": pa.array(lp_tok, pa.int32()),
        "retokenised_match": pa.array(match, pa.bool_()),
        "check_rel_err": pa.array(check, pa.float32()),
    })
    return {"features": feats, "table": table, "tokens": int(lp_tok.sum()),
            "mismatched": sum(1 for m in match if m is False)}
