"""Preference pairs as token ids for adapter training: prompt as the sampler sends it, answers
tokenised on their own (the rows `qprobe collect` embeds), EOS after a complete answer.

Cut-offs (CPU budgets): the prompt keeps its last `max_prompt_tokens` tokens (the turn being
answered is at its end); an answer keeps its first `max_answer_tokens` tokens and, when cut, gets
no EOS (the sequence reward then stops at the cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenPair:
    prompt_id: str
    prompt: list[int]
    chosen: list[int]  # answer tokens (+ EOS when the answer is whole)
    rejected: list[int]


def tokenise_pairs(pairs: list[dict], tok, eos_id: int | None, max_prompt_tokens: int | None,
                   max_answer_tokens: int | None) -> list[TokenPair]:
    """`pairs`: rows {prompt_id, prompt, chosen, rejected} (`Preferences.pairs`); `tok`: the
    backend's `PromptTokenizer` (chat template or not, as the sampler)."""
    out = []
    for p in pairs:
        prompt = tok.prompt_ids(p["prompt"])
        if max_prompt_tokens and len(prompt) > max_prompt_tokens:
            prompt = prompt[-max_prompt_tokens:]
        answers = []
        for role in ("chosen", "rejected"):
            ids = tok.completion_ids(p[role])
            if max_answer_tokens and len(ids) >= max_answer_tokens:
                ids = ids[:max_answer_tokens]
            elif eos_id is not None:
                ids = ids + [int(eos_id)]
            answers.append(ids)
        out.append(TokenPair(str(p["prompt_id"]), prompt, answers[0], answers[1]))
    return out


def batch_tensors(pairs: list[TokenPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows chosen 0..B-1 then rejected B..2B-1, right-padded:
    input_ids, attention_mask [2B, T]; action_mask [2B, T-1]: True at position t when token t+1
    is an answer token (the action taken in state t)."""
    seqs, n_prompt = [], []
    for role in ("chosen", "rejected"):
        for p in pairs:
            seqs.append(p.prompt + getattr(p, role))
            n_prompt.append(len(p.prompt))
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    act = torch.zeros((len(seqs), t - 1), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        act[i, n - 1 : len(s) - 1] = True
    return {"input_ids": ids, "attention_mask": mask, "action_mask": act}
