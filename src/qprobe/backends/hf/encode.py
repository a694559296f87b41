"""Given completions after one prompt, in one forward pass: log-likelihoods and features.

`GroupEncoder` runs the prompt once and its completions as one batch over the prompt's KV cache,
computing logits only at completion positions: how `qprobe embed` re-encodes stored samples, how
a preference collection embeds both answers of a pair, and how `textquality` scores text.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import numpy as np
import torch


class GroupEncoder:
    """One forward pass for one prompt and its completions: log-likelihoods and features.

    Works on any transformers causal LM whose `.model` returns a cache and whose blocks are
    reachable (`decoder_blocks`); the prompt's KV cache is repeated over the completions.
    """

    def __init__(self, model, layers: Sequence[int], blocks: Sequence[torch.nn.Module]) -> None:
        self.model = model
        self.layers = list(layers)
        self.blocks = blocks
        self.dev = next(model.parameters()).device
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before).
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def encode(self, prompt_ids: list[int], completions: list[list[int]], pad_id: int = 0
               ) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, np.ndarray]]]:
        """(logprob_sum [n], logprob_tokens [n], {layer: {"last": [n, D], "mean": [n, D]}})."""
        from transformers import DynamicCache

        n = len(completions)
        lens = np.array([len(c) for c in completions], dtype=np.int64)  # [n]
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.blocks[layer].register_forward_hook(self._grab(captured, layer))
                 for layer in self.layers]
        try:
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.dev)  # [1, P]
            cache = DynamicCache(config=self.model.config)
            out = self.model.model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True)
            prompt_last = {layer: captured[layer][0, -1].float() for layer in self.layers}  # [D]
            h_prompt = out.last_hidden_state[0, -1]  # [D], after the final norm
            logprob = np.zeros(n)
            feats = {layer: {pos: np.tile(prompt_last[layer].cpu().numpy(), (n, 1))
                             for pos in ("last", "mean")} for layer in self.layers}
            for rows in length_chunks(lens):
                self._encode_rows(rows, completions, lens, cache, h_prompt, captured, pad_id,
                                  logprob, feats)
            return logprob, lens, feats
        finally:
            for hk in hooks:
                hk.remove()

    def _encode_rows(self, rows: np.ndarray, completions: list[list[int]], lens: np.ndarray,
                     prompt_cache, h_prompt: torch.Tensor, captured: dict[int, torch.Tensor],
                     pad_id: int, logprob: np.ndarray, feats: dict[int, dict[str, np.ndarray]]
                     ) -> None:
        """Run completions `rows` (similar lengths, none empty) after the shared prompt cache."""
        n, ln = len(rows), lens[rows]
        longest = int(ln.max())
        comp = torch.full((n, longest), pad_id, dtype=torch.long)  # right padded [n, C]
        for a, i in enumerate(rows):
            comp[a, : ln[a]] = torch.tensor(completions[i], dtype=torch.long)
        comp = comp.to(self.dev)
        cache = copy.deepcopy(prompt_cache)  # the prompt's KV [1, ...] -> [n, ...]
        cache.batch_repeat_interleave(n)
        out = self.model.model(input_ids=comp, **{self._cache_kw: cache}, use_cache=True)
        # Position j of the completion is predicted from the hidden state before it.
        h = torch.cat([h_prompt.expand(n, 1, -1), out.last_hidden_state[:, :-1]], dim=1)
        logprob[rows] = self._token_logprobs(h, comp, ln)  # [n]
        valid = torch.arange(longest, device=self.dev)[None, :] < torch.as_tensor(ln, device=self.dev)[:, None]
        m = valid[..., None].float()  # [n, C, 1]
        last_idx = torch.as_tensor(ln - 1, device=self.dev)
        for layer in self.layers:
            hl = captured[layer].float()  # [n, C, D]
            feats[layer]["last"][rows] = hl[torch.arange(n, device=self.dev), last_idx].cpu().numpy()
            feats[layer]["mean"][rows] = ((hl * m).sum(1) / m.sum(1)).cpu().numpy()

    @staticmethod
    def _grab(store: dict[int, torch.Tensor], layer: int):
        def hook(_mod, _inp, output):
            store[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def _token_logprobs(self, h: torch.Tensor, comp: torch.Tensor, lens: np.ndarray,
                        chunk: int = 512) -> np.ndarray:
        """Sum over each row's real positions of log softmax(lm_head(h))[token]: [n] float64."""
        n, longest, _ = h.shape
        valid = (torch.arange(longest)[None, :] < torch.as_tensor(lens)[:, None]).reshape(-1)
        flat_h = h.reshape(n * longest, -1)[valid.to(h.device)]  # [T, D]
        flat_t = comp.reshape(-1)[valid.to(comp.device)]  # [T]
        row = torch.arange(n).repeat_interleave(torch.as_tensor(lens))  # [T]
        out = torch.zeros(n, dtype=torch.float64)
        head = self.model.get_output_embeddings()
        for s in range(0, flat_h.shape[0], chunk):
            logits = head(flat_h[s : s + chunk]).float()  # [c, V]
            lp = logits.gather(1, flat_t[s : s + chunk, None]).squeeze(1) - torch.logsumexp(logits, 1)
            out.index_add_(0, row[s : s + chunk], lp.double().cpu())
        return out.numpy()


def length_chunks(lens: np.ndarray, waste: float = 1.25, min_rows: int = 4) -> list[np.ndarray]:
    """Non-empty rows sorted by length, cut so that padding each chunk to its longest row costs
    at most `waste` x its real tokens (chunks of fewer than `min_rows` rows are not cut off)."""
    order = [int(i) for i in np.argsort(lens, kind="stable") if lens[i] > 0]
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        if cur is not None and (len(cur) < min_rows or
                                (len(cur) + 1) * lens[i] <= waste * (lens[cur].sum() + lens[i])):
            cur.append(i)
        else:
            chunks.append([i])
    return [np.asarray(c, dtype=np.int64) for c in chunks]
