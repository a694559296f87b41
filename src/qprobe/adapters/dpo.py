"""DPO on the same LoRA as the Q-Adapter, with TRL's `DPOTrainer` (the anchor users know).

The pairs are those the Q-Adapter trains on, cut to the same token budgets: the prompt keeps its
last `max_prompt_tokens` tokens and each answer its first `max_answer_tokens`, decoded back to
text (TRL tokenises text itself and appends EOS). With a chat template the prompt is the
template's rendering of the user turn with the generation prompt, the exact string the sampler
and `qprobe collect` send, so TRL sees it as plain text. The reference policy is the base model
(TRL disables the adapter for it). LoRA dropout stays on (`disable_dropout=False`), as in the
Q-Adapter run. TRL checkpoints every `save_every` steps into OUT/trl/ and a rerun resumes from
the last one.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qprobe.adapters.methods import AdapterMethod
from qprobe.adapters.train import FORMAT, AdaptConfig, load_pairs, need_peft
from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write_json


def dpo_rows(pairs: list[dict], tok, max_prompt_tokens: int | None, max_answer_tokens: int | None
             ) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} texts for TRL: the prompt as the sampler renders it, cut."""
    tk = tok.tokenizer
    rows = []
    for p in pairs:
        ids = tok.prompt_ids(p["prompt"])
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
        row = {"prompt": tk.decode(ids, skip_special_tokens=False)}
        for role in ("chosen", "rejected"):
            a = tok.completion_ids(p[role])
            if max_answer_tokens and len(a) > max_answer_tokens:
                a = a[:max_answer_tokens]
            row[role] = tk.decode(a, skip_special_tokens=False)
        rows.append(row)
    return rows


def train_dpo(cfg: AdaptConfig, bundle: tuple | None = None, say=print) -> dict[str, Any]:
    """Train (or resume) DPO on a LoRA with TRL; returns the adapter.json contents."""
    from qprobe.adapters.train import _finished
    from qprobe.backends.hf.model import load_hf
    from qprobe.backends.hf.tokenizer import PromptTokenizer

    cfg.validate()
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        raise QProbeError("adapt: --method dpo needs trl (pip install 'qprobe[adapters]')") from None
    peft = need_peft()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _finished(out, cfg)
    if done is not None:
        say(f"adapt: {out} is already trained")
        return done
    pairs = load_pairs(cfg)
    model, tokenizer, identity = bundle or load_hf(cfg.model, device=cfg.device)
    tok = PromptTokenizer(tokenizer, cfg.chat)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ds = Dataset.from_list(dpo_rows(pairs, tok, cfg.max_prompt_tokens, cfg.max_answer_tokens))
    lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.target_modules), bias="none",
                           task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=cfg.batch_pairs,
        num_train_epochs=cfg.epochs, learning_rate=cfg.lr, lr_scheduler_type="constant",
        beta=cfg.beta, max_length=None, disable_dropout=False, seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_every, logging_steps=1, report_to="none",
        use_cpu=next(model.parameters()).device.type == "cpu", dataloader_num_workers=0,
        gradient_accumulation_steps=1, save_only_model=False, warmup_steps=0,
        # TRL defaults to bf16 autocast and gradient checkpointing: on a CPU without bf16
        # matmuls that made a step ~20x slower than the same step in fp32. fp32 and no
        # checkpointing, as the Q-Adapter trains.
        bf16=False, fp16=False, gradient_checkpointing=False,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=lcfg)
    ckpts = sorted((out / "trl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpts[-1]) if ckpts else None)
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(out / "adapter")
    logs = [x for x in trainer.state.log_history if "loss" in x]
    tail = logs[-max(1, len(logs) // 10):]
    keys = ("loss", "rewards/accuracies", "rewards/margins")
    info = {"format": FORMAT, "method": "dpo", "params": {"beta": cfg.beta},
            "base_model": identity, "chat": tok.chat, "config_identity": cfg.identity(),
            "config": asdict(cfg), "pairs": len(pairs), "steps": int(result.global_step),
            "seconds": round(seconds, 1), "trl": __import__("trl").__version__,
            "final": {k: sum(x[k] for x in tail) / len(tail) for k in keys if tail and k in tail[0]}}
    atomic_write_json(out / "adapter.json", info)
    return info


class DPOMethod(AdapterMethod):
    """DPO as an entry of the adapter method registry (`adapters/methods.py`): trained by TRL;
    sampled from the LoRA merged into a copy of the base model (no features: its hidden states
    are another model's); implicit reward beta * (log pi(y|x) - log pi_ref(y|x))."""

    key = "dpo"

    def train(self, cfg, bundle=None, say=print) -> dict[str, Any]:
        return train_dpo(cfg, bundle, say)

    def language_model(self, peft_model, base, tokenizer, info, *, name: str, **kw: Any):
        from qprobe.backends.hf.model import HFLanguageModel

        kw.pop("position", None)
        kw.pop("feature_dtype", None)
        kw["features"] = False
        return HFLanguageModel(peft_model.merge_and_unload(), tokenizer, identity=name,
                               chat=info["chat"], **kw)

    def implicit_reward(self, peft_model, info, batch):
        from qprobe.adapters.policy import sequence_logp
        from qprobe.adapters.qadapter import action_logits

        lm = peft_model.get_base_model()
        act, ids = batch["action_mask"], batch["input_ids"]
        pol = sequence_logp(action_logits(lm, ids, batch["attention_mask"], act), ids, act)
        with peft_model.disable_adapter():
            ref = sequence_logp(action_logits(lm, ids, batch["attention_mask"], act), ids, act)
        return info["params"]["beta"] * (pol - ref)

    def policy_logp(self, adapter_logits, base_logp, info):
        import torch

        return torch.log_softmax(adapter_logits, -1)
