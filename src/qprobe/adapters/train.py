"""Training a preference adapter (Q-Adapter here, DPO in `dpo.py`) on a pairs task, resumable.

`qprobe adapt --method qadapter --task hh-harmless --split train --out runs/qa` loads the base
model, adds a LoRA (peft) to it, and runs AdamW over shuffled batches of pairs for `epochs`
epochs. Every `save_every` steps the LoRA weights, the optimiser state and the log go to
`OUT/checkpoint.pt` (atomically); a rerun of the same command resumes from it, and a run with
other settings is refused. The result is `OUT/adapter/` (peft's adapter files) and
`OUT/adapter.json` (method, constants, base model, chat, cut-offs, metrics, seconds).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe.adapters.config import FORMAT, METHODS, AdaptConfig  # noqa: F401
from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write, atomic_write_json


def need_peft():
    try:
        import peft
    except ImportError:
        raise QProbeError("adapt: needs peft (pip install 'qprobe[adapters]')") from None
    return peft


def add_lora(model, cfg: AdaptConfig):
    """The base model with a fresh LoRA (peft; B = 0, so the adapter starts as the identity)."""
    peft = need_peft()
    torch.manual_seed(cfg.seed)
    lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.target_modules), bias="none",
                           task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lcfg)


def load_pairs(cfg: AdaptConfig) -> list[dict]:
    from qprobe.tasks import load_task

    task = load_task(cfg.task, cfg.data)
    if not hasattr(task, "pairs"):
        raise QProbeError(f"adapt: task {cfg.task} has no preference pairs")
    pairs = task.pairs(cfg.split, cfg.limit)
    if not pairs:
        raise QProbeError(f"adapt: task {cfg.task} split {cfg.split} has no pairs")
    return pairs


def train_qadapter(cfg: AdaptConfig, bundle: tuple | None = None, say=print) -> dict[str, Any]:
    """Train (or resume) a Q-Adapter; returns the adapter.json contents.

    bundle: (hf_model, tokenizer, identity) to skip loading (tests pass tiny models)."""
    from qprobe.adapters.data import batch_tensors, tokenise_pairs
    from qprobe.adapters.qadapter import QAdapterParams, forward_rewards, qadapter_loss
    from qprobe.backends.hf.model import load_hf
    from qprobe.backends.hf.tokenizer import PromptTokenizer, pad_id

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _finished(out, cfg)
    if done is not None:
        say(f"adapt: {out} is already trained")
        return done
    pairs = load_pairs(cfg)
    model, tokenizer, identity = bundle or load_hf(cfg.model, device=cfg.device)
    tok = PromptTokenizer(tokenizer, cfg.chat)
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    data = tokenise_pairs(pairs, tok, eos, cfg.max_prompt_tokens, cfg.max_answer_tokens)
    p = QAdapterParams(cfg.a, cfg.a0, cfg.gamma, cfg.beta)
    for prm in model.parameters():
        prm.requires_grad_(False)
    peft_model = add_lora(model, cfg)
    dev = next(model.parameters()).device
    params = [q for q in peft_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    per_epoch = math.ceil(len(data) / cfg.batch_pairs)
    total = per_epoch * cfg.epochs
    meta = {"identity": cfg.identity(), "base_model": identity, "chat": tok.chat}
    state = _resume(out, meta, peft_model, opt)
    step, log, seconds = state["step"], state["log"], state["seconds"]
    if step:
        say(f"adapt: resuming {out} at step {step} of {total}")
    peft_model.train()
    t0 = time.perf_counter()
    while step < total:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data))
        batch = batch_tensors([data[j] for j in order[i * cfg.batch_pairs:(i + 1) * cfg.batch_pairs]],
                              pad)
        batch = {k: v.to(dev) for k, v in batch.items()}
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: the same on a resume
        r = forward_rewards(peft_model, batch, p)
        loss, stats = qadapter_loss(r, batch["action_mask"], p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log.append({"step": step, "loss": float(loss.detach()), **stats})
        if step % cfg.save_every == 0 or step == total:
            secs = seconds + time.perf_counter() - t0
            _checkpoint(out, meta, peft_model, opt, step, log, secs)
            recent = log[-cfg.save_every:]
            say(f"adapt: step {step}/{total}, loss {np.mean([x['loss'] for x in recent]):.4f}, "
                f"train pair accuracy {np.mean([x['accuracy'] for x in recent]):.3f}, {secs:.0f}s")
    seconds += time.perf_counter() - t0
    return _finish(out, cfg, meta, peft_model, p.to_dict(), log, seconds, len(data), total)


def _trainable(peft_model) -> dict[str, torch.Tensor]:
    return {n: q.detach().cpu() for n, q in peft_model.named_parameters() if q.requires_grad}


def _checkpoint(out: Path, meta: dict, peft_model, opt, step: int, log: list, seconds: float
                ) -> None:
    obj = {"meta": meta, "step": step, "lora": _trainable(peft_model), "optim": opt.state_dict(),
           "log": log, "seconds": seconds}
    atomic_write(out / "checkpoint.pt", lambda f: torch.save(obj, f))


def _resume(out: Path, meta: dict, peft_model, opt) -> dict[str, Any]:
    path = out / "checkpoint.pt"
    if not path.is_file():
        return {"step": 0, "log": [], "seconds": 0.0}
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if obj["meta"] != json.loads(json.dumps(meta)):
        raise QProbeError(f"adapt: {out} holds a run with other settings; use another --out or "
                          "delete it")
    names = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n, v in obj["lora"].items():
            names[n].copy_(v)
    opt.load_state_dict(obj["optim"])
    return obj


def _finished(out: Path, cfg: AdaptConfig) -> dict | None:
    f = out / "adapter.json"
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    if info.get("config_identity") != json.loads(json.dumps(cfg.identity())):
        raise QProbeError(f"adapt: {out} holds an adapter trained with other settings")
    return info


def _finish(out: Path, cfg: AdaptConfig, meta: dict, peft_model, params: dict, log: list,
            seconds: float, n_pairs: int, steps: int) -> dict[str, Any]:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    peft_model.save_pretrained(tmp)
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    tmp.rename(out / "adapter")
    tail = log[-max(1, len(log) // 10):]
    info = {"format": FORMAT, "method": cfg.method, "params": params,
            "base_model": meta["base_model"], "chat": meta["chat"],
            "config_identity": cfg.identity(), "config": asdict(cfg),
            "pairs": n_pairs, "steps": steps, "seconds": round(seconds, 1),
            "final": {k: float(np.mean([x[k] for x in tail])) for k in tail[0] if k != "step"}}
    atomic_write_json(out / "adapter.json", info)
    return info


def load_adapter(folder: str | Path, device: str | None = None, bundle: tuple | None = None):
    """(peft model on a fresh copy of the base, base model, tokenizer, adapter.json info)."""
    import copy

    from qprobe.backends.hf.model import load_hf

    peft = need_peft()
    folder = Path(folder)
    f = folder / "adapter.json"
    if not f.is_file():
        raise QProbeError(f"{folder}: not an adapter folder (no adapter.json)")
    info = json.loads(f.read_text())
    if info.get("format") != FORMAT:
        raise QProbeError(f"{f}: format {info.get('format')!r}, expected {FORMAT!r}")
    base, tokenizer, identity = bundle or load_hf(info["config"]["model"], device=device)
    if identity != info["base_model"]:
        raise QProbeError(f"{folder}: trained on {info['base_model']!r}, not {identity!r}")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder / "adapter")
    peft_model.eval()
    return peft_model, base, tokenizer, info
