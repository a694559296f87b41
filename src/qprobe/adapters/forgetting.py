"""What an adapter forgets: the perplexity of held-out general text under its policy vs the base's.

Q-Adapter's claim is that a residual Q-function keeps the base model's abilities where DPO
fine-tuning erodes them. One measure of that is how well each policy still predicts ordinary text
that has nothing to do with the preference data: per text, the summed log-likelihood of its tokens
under the base model pi_0 and under the adapter's policy (Q-Adapter: softmax((Q + a0 log pi_0) /
a); DPO: the model with the LoRA on), and the perplexity over all tokens. The ratio adapter / base
is reported with a bootstrap CI over texts. (A probe cannot forget: it never changes the model's
distribution; best-of-k only chooses among the base model's own samples.)

Texts are read as plain text, no chat template, truncated to `max_tokens` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe.errors import QProbeError


def read_texts(path: str | Path, fields: list[str], limit: int | None = None) -> list[str]:
    """Texts of a JSONL file (each row's `fields` joined by a newline) or a .txt file (one per
    blank-line-separated paragraph)."""
    p = Path(path)
    if not p.is_file():
        raise QProbeError(f"{p}: no such text file")
    if p.suffix == ".txt":
        texts = [t.strip() for t in p.read_text().split("\n\n") if t.strip()]
    else:
        texts = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [f for f in fields if not isinstance(row.get(f), str)]
            if missing:
                raise QProbeError(f"{p}:{n}: no text field {missing[0]!r} (--text-fields)")
            texts.append("\n".join(row[f] for f in fields))
    if not texts:
        raise QProbeError(f"{p}: no texts")
    return texts[:limit] if limit else texts


@torch.no_grad()
def text_logprobs(peft_model, info: dict[str, Any], ids: list[list[int]], pad_id: int,
                  batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(base [n], adapter policy [n]): each text's summed log-likelihood of its tokens after the
    first, under pi_0 and under the adapter's policy."""
    from qprobe.adapters.methods import method
    from qprobe.adapters.policy import sequence_logp
    from qprobe.adapters.qadapter import action_logits

    impl = method(info["method"])

    peft_model.eval()
    lm = peft_model.get_base_model()
    dev = next(lm.parameters()).device
    base_out, pol_out = [], []
    for i in range(0, len(ids), batch):
        part = ids[i : i + batch]
        t = max(len(x) for x in part)
        inp = torch.full((len(part), t), pad_id, dtype=torch.long)
        att = torch.zeros((len(part), t), dtype=torch.long)
        for j, x in enumerate(part):  # right padding: positions start at 0 for every text
            inp[j, : len(x)] = torch.tensor(x)
            att[j, : len(x)] = 1
        inp, att = inp.to(dev), att.to(dev)
        act = att[:, 1:].bool()  # [B, T-1] predict token t+1 where it is real
        q = action_logits(lm, inp, att, act)  # [N, V] adapter on
        with peft_model.disable_adapter():
            base_logp = torch.log_softmax(action_logits(lm, inp, att, act), -1)  # [N, V]
        pol_logp = impl.policy_logp(q, base_logp, info)
        for out, lp in ((base_out, base_logp), (pol_out, pol_logp)):
            out.append(sequence_logp(lp, inp, act).double().cpu().numpy())
    return np.concatenate(base_out), np.concatenate(pol_out)


def perplexity(folder: str | Path, texts: list[str], max_tokens: int = 256, n_boot: int = 1000,
               seed: int = 0, device: str | None = None, bundle: tuple | None = None
               ) -> dict[str, Any]:
    """Perplexity of `texts` under the base model and under the adapter's policy, and their
    ratio with a 95% bootstrap CI over texts."""
    from qprobe.adapters.train import load_adapter
    from qprobe.backends.hf.tokenizer import pad_id

    peft_model, _, tokenizer, info = load_adapter(folder, device, bundle)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    keep = [x for x in ids if len(x) >= 2]
    if not keep:
        raise QProbeError("perplexity: every text is shorter than 2 tokens")
    pad = pad_id(tokenizer)
    base, pol = text_logprobs(peft_model, info, keep, pad)
    n_tok = np.array([len(x) - 1 for x in keep], dtype=float)  # [n] predicted tokens per text

    def ppl(lp: np.ndarray, n: np.ndarray) -> float:
        return float(np.exp(-lp.sum() / n.sum()))

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(keep), len(keep))
        boots.append(ppl(pol[i], n_tok[i]) / ppl(base[i], n_tok[i]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"adapter": str(folder), "method": info["method"], "n_texts": len(keep),
            "n_tokens": int(n_tok.sum()), "max_tokens": max_tokens,
            "ppl_base": ppl(base, n_tok), "ppl_adapter": ppl(pol, n_tok),
            "ratio": ppl(pol, n_tok) / ppl(base, n_tok), "ratio_ci": [float(lo), float(hi)]}
