"""Any transformers causal LM through its own forward: `GenericDecoder`, and `decoder_blocks`.

The fallback for architectures `llama.FastDecoder` does not know; it runs the same decode loop
(`loop.run_batch`) with the same sampling, stop handling and features.
"""

from __future__ import annotations

import torch


def decoder_blocks(hf_model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (model.layers, transformer.h, ...)."""
    owners = [getattr(hf_model, "model", None), getattr(hf_model, "transformer", None)]
    if hasattr(hf_model, "get_decoder"):
        owners.insert(0, hf_model.get_decoder())
    for owner in owners:
        for name in ("layers", "h", "blocks"):
            blocks = getattr(owner, name, None) if owner is not None else None
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return blocks
    raise TypeError(f"cannot find the decoder blocks of {type(hf_model).__name__}")


class StopForward(Exception):
    """Raised by a forward hook to end a forward pass after the block it reads."""


class GenericDecoder:
    """Any transformers causal LM through its own forward and DynamicCache.

    The fallback for architectures `FastDecoder` does not know: same loop, sampling, stop
    handling and features (a hook on the feature block), but the prompt cache is copied to the
    k rows after the prefill and each step pays transformers' per-call overhead.
    """

    def __init__(self, hf_model) -> None:
        self.model = hf_model
        self.blocks = decoder_blocks(hf_model)
        self.n_layers = len(self.blocks)
        param = next(hf_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.dim = int(hf_model.config.hidden_size)

    def _forward(self, layer: int, stop: bool, **kw):
        captured: list[torch.Tensor] = []

        def hook(_mod, _inp, out):
            captured.append(out[0] if isinstance(out, tuple) else out)
            if stop:
                raise StopForward

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
        except StopForward:
            out = None
        finally:
            handle.remove()
        return out, captured[0][:, -1]  # residual after `layer` at the last position [N, D]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, layer: int):
        from transformers import DynamicCache

        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        out, feat = self._forward(layer, False, input_ids=ids, attention_mask=valid.long(),
                                  position_ids=pos, past_key_values=DynamicCache(config=self.model.config))
        state = {"cache": out.past_key_values, "mask": valid.long(), "expanded": False}
        return out.logits[:, -1].float(), feat.float(), state

    @torch.no_grad()
    def step(self, state: dict, tok: torch.Tensor, pos: torch.Tensor, s: int, k: int, layer: int,
             n_steps: int, logits: bool = True):
        if not state["expanded"]:  # one cache row per sample from here on
            state["cache"].batch_repeat_interleave(k)
            state["mask"] = state["mask"].repeat_interleave(k, 0)
            state["expanded"] = True
        b = tok.shape[0]
        mask = torch.cat([state["mask"], state["mask"].new_ones(b, s + 1)], dim=1)
        out, feat = self._forward(layer, not logits, input_ids=tok[:, None], attention_mask=mask,
                                  position_ids=pos[:, None], past_key_values=state["cache"])
        return (None if out is None else out.logits[:, -1].float()), feat

    def select(self, state: dict, keep_g: torch.Tensor, keep_r: torch.Tensor, slots: torch.Tensor,
               s: int, k: int) -> dict:
        if not state["expanded"]:  # rows are dropped one by one: expand to one cache row each
            state["cache"].batch_repeat_interleave(k)
            state["mask"] = state["mask"].repeat_interleave(k, 0)
            state["expanded"] = True
        state["cache"].batch_select_indices(keep_r)
        state["mask"] = state["mask"].index_select(0, keep_r)
        return state

