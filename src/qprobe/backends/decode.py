"""A fast k-sample decode loop for Llama-family decoders (Llama, Mistral, Qwen2), with features.

(Other transformers architectures run the same loop through `GenericDecoder`, slower.)

Why not `model.generate`: for best-of-k sampling it prefills every prompt k times, grows its
KV cache by concatenation, sorts the whole vocabulary for top-p at every step, and (with
`output_hidden_states`) keeps every layer's hidden state at every step. Here instead:

- each prompt is prefilled once; its KV cache is *shared* by its k rows (never copied k times):
  decode attention scores the prompt part per prompt group and the generated part per row, and
  joins them in one softmax;
- the generated part lives in a preallocated KV buffer (no concatenation);
- tokens every prompt of a batch starts with (a few-shot prefix, a chat template's system
  prompt) are run once and their cache is shared by all rows;
- a row that finishes (EOS, stop string) leaves the batch at once: its matmuls stop, so a
  few long samples do not make every short one pay for their length;
- projections are fused (q|k|v, gate|up) so each step is a few large matmuls;
- top-p takes the top 64 logits and checks their mass; only rows whose nucleus is wider than
  that fall back to a full sort;
- randomness is counter-based per (prompt, sample, step), so a sample does not depend on what
  else shares its batch;
- the Q-probe feature is the residual stream after block `layer` for the current step only,
  copied into a [rows, steps, dim] buffer; the stop-string cut then picks the last kept token.
  A completion that ran to max_new_tokens gets one extra partial forward (up to `layer`) for its
  last token.

Shapes: P prompts, k samples each, B = P * k rows, T0 padded prompt length, D hidden size,
H query heads, Hkv key/value heads, G = H // Hkv, hd head dim, V vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
TOP_K_PREFILTER = 64
PREFILL_TOKENS = 4096  # prompt tokens per prefill chunk (bounds activation memory)
MIN_SHARED_PREFIX = 16  # prompts of a batch starting with this many equal tokens share them


def supports(hf_model) -> bool:
    """True when `FastDecoder` can run this transformers model."""
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if getattr(cfg, "use_sliding_window", False) or (
        cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)
    ):
        return False
    inner = getattr(hf_model, "model", None)
    return inner is not None and hasattr(inner, "layers") and hasattr(inner, "rotary_emb")


@dataclass
class _Layer:
    ln1: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2 Hkv) * hd, D]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [D, H * hd]
    bo: torch.Tensor | None
    ln2: torch.Tensor  # [D]
    wgu: torch.Tensor  # [2 * F, D]
    bgu: torch.Tensor | None
    wd: torch.Tensor  # [D, F]
    bd: torch.Tensor | None


def _cat_bias(*mods) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat(
        [m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in mods]
    ).detach()


def _fuse(*mods) -> torch.Tensor:
    """Concatenate the weights of linear layers [sum(out), in], and point each layer's weight at
    its rows of the fused tensor, so the model keeps working without a second copy in memory."""
    fused = torch.cat([m.weight.detach() for m in mods]).contiguous()
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row : row + n], requires_grad=False)
        row += n
    return fused


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class FastDecoder:
    """The weights of a transformers Llama-family model, re-laid out for batched decoding."""

    def __init__(self, hf_model) -> None:
        cfg = hf_model.config
        inner = hf_model.model
        a0 = inner.layers[0].self_attn
        self.n_layers = len(inner.layers)
        self.hd = int(getattr(a0, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.h = int(cfg.num_attention_heads)
        self.hkv = int(getattr(cfg, "num_key_value_heads", None) or self.h)
        self.scale = float(getattr(a0, "scaling", self.hd**-0.5))
        self.eps = float(cfg.rms_norm_eps)
        self.dim = int(cfg.hidden_size)
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()  # [V, D]
        self.norm = inner.norm.weight.detach()
        self.lm_head = hf_model.lm_head.weight.detach()  # [V, D] (tied or not)
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for blk in inner.layers:
                at, mlp = blk.self_attn, blk.mlp
                self.layers.append(
                    _Layer(
                        ln1=blk.input_layernorm.weight.detach(),
                        wqkv=_fuse(at.q_proj, at.k_proj, at.v_proj),
                        bqkv=_cat_bias(at.q_proj, at.k_proj, at.v_proj),
                        wo=at.o_proj.weight.detach(),
                        bo=None if at.o_proj.bias is None else at.o_proj.bias.detach(),
                        ln2=blk.post_attention_layernorm.weight.detach(),
                        wgu=_fuse(mlp.gate_proj, mlp.up_proj),
                        bgu=_cat_bias(mlp.gate_proj, mlp.up_proj),
                        wd=mlp.down_proj.weight.detach(),
                        bd=None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
                    )
                )
        self.device = self.embed.device
        self.dtype = self.embed.dtype

    # -- pieces shared by prefill and decode ------------------------------------------------
    def _qkv(self, lyr: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, T, D] -> q [N, H, T, hd], k/v [N, Hkv, T, hd] (rotary applied)."""
        n, t, _ = x.shape
        h = F.rms_norm(x, (self.dim,), lyr.ln1, self.eps)
        qkv = F.linear(h, lyr.wqkv, lyr.bqkv)  # [N, T, (H + 2 Hkv) hd]
        qk, v = qkv.split([(self.h + self.hkv) * self.hd, self.hkv * self.hd], dim=-1)
        qk = _rotate(qk.view(n, t, self.h + self.hkv, self.hd).transpose(1, 2), cos, sin)
        q, k = qk.split([self.h, self.hkv], dim=1)  # one rotary pass for q and k
        return q, k, v.view(n, t, self.hkv, self.hd).transpose(1, 2)

    def _mlp(self, lyr: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (self.dim,), lyr.ln2, self.eps)
        gate, up = F.linear(h, lyr.wgu, lyr.bgu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, lyr.wd, lyr.bd)

    def _rope(self, pos: torch.Tensor):
        """pos [N, T] -> cos, sin [N, 1, T, hd]."""
        cos, sin = self.rotary(self.embed[:1], pos)
        return cos.unsqueeze(1).to(self.dtype), sin.unsqueeze(1).to(self.dtype)

    # -- prefill ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, layer: int,
                prefix: torch.Tensor | None = None):
        """Run left-padded prompts once, after an optional shared prefix.

        ids, valid: [P, T0] (valid False on left padding); prefix: [L] token ids every prompt
        starts with (run once; ids hold what follows it).
        Returns logits of the last position [P, V], the residual after block `layer` at the last
        position [P, D], and the per-layer prompt cache [(k, v) each [P, Hkv, T0, hd]].
        Prompts run shortest first in chunks of about PREFILL_TOKENS tokens, each chunk padded
        only to its own longest prompt: one batch of long, uneven prompts would hold [P, T0, 2F]
        MLP activations (gigabytes) and spend most of its work on padding.
        """
        p, t0 = ids.shape
        shared = None
        if prefix is not None and len(prefix):
            _, _, pst = self._prefill(prefix[None], torch.ones_like(prefix[None], dtype=torch.bool), -1)
            shared = pst["prompt"]  # per layer (k, v) [1, Hkv, L, hd]
        lens = valid.sum(-1).tolist()
        chunks: list[list[int]] = [[]]
        for i in sorted(range(p), key=lambda i: lens[i]):
            if chunks[-1] and (len(chunks[-1]) + 1) * lens[i] > PREFILL_TOKENS:
                chunks.append([])
            chunks[-1].append(i)
        if len(chunks) == 1 and max(lens) == t0:
            logits, feat, state = self._prefill(ids, valid, layer, shared)
            state["prefix"] = shared
            return logits, feat, state
        dev = ids.device
        logits = feat = cache = None
        bias = torch.full((p, 1, 1, t0), float("-inf"), dtype=self.dtype, device=dev)
        for idx in chunks:
            tc = max(lens[i] for i in idx)
            it = torch.tensor(idx, device=dev)
            lg, ft, st = self._prefill(ids[it, t0 - tc :], valid[it, t0 - tc :], layer, shared)
            if logits is None:
                logits = lg.new_empty(p, lg.shape[1])
                feat = None if ft is None else ft.new_empty(p, ft.shape[1])
                cache = [tuple(t.new_zeros(p, t.shape[1], t0, t.shape[3]) for t in kv)
                         for kv in st["prompt"]]
            logits[it] = lg
            if feat is not None:
                feat[it] = ft
            for (ck, cv), (k, v) in zip(cache, st["prompt"]):
                ck[it, :, t0 - tc :] = k
                cv[it, :, t0 - tc :] = v
            bias[it, :, :, t0 - tc :] = st["bias"]
        return logits, feat, {"prompt": cache, "bias": bias, "gen": None, "prefix": shared}

    def _prefill(self, ids: torch.Tensor, valid: torch.Tensor, layer: int, shared=None):
        """One prefill chunk; shared: per layer (k, v) [1, Hkv, L, hd] of a prefix before it."""
        p, t0 = ids.shape
        n_shared = 0 if shared is None else shared[0][0].shape[2]
        pos = n_shared + (valid.long().cumsum(-1) - 1).clamp(min=0)  # [P, T0]
        cos, sin = self._rope(pos)
        causal = torch.ones(t0, t0, dtype=torch.bool, device=ids.device).tril()
        # Pad queries may see themselves, so no softmax row is empty (their output is unused).
        mask = (causal & valid[:, None, :]) | torch.eye(t0, dtype=torch.bool, device=ids.device)
        if n_shared:  # every query sees the whole prefix
            mask = torch.cat([mask.new_ones(p, t0, n_shared), mask], dim=-1)
        mask = mask[:, None]  # [P, 1, T0, L + T0]
        x = F.embedding(ids, self.embed)  # [P, T0, D]
        cache = []
        feat = None
        for i, lyr in enumerate(self.layers):
            q, k, v = self._qkv(lyr, x, cos, sin)
            # Own copies: k and v are views into the q|k|v activations, 9x their size.
            cache.append((k.contiguous(), v.contiguous()))
            if n_shared:
                sk, sv = shared[i]
                k = torch.cat([sk.expand(p, -1, -1, -1), k], dim=2)  # [P, Hkv, L + T0, hd]
                v = torch.cat([sv.expand(p, -1, -1, -1), v], dim=2)
            att = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.h != self.hkv
            )  # [P, H, T0, hd]
            x = x + F.linear(att.transpose(1, 2).reshape(p, t0, -1), lyr.wo, lyr.bo)
            x = self._mlp(lyr, x)
            if i == layer:
                feat = x[:, -1].float()
        h = F.rms_norm(x[:, -1], (self.dim,), self.norm, self.eps)
        bias = torch.zeros(p, 1, 1, t0, dtype=self.dtype, device=ids.device)
        bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
        state = {"prompt": cache, "bias": bias, "gen": None}
        return F.linear(h, self.lm_head).float(), feat, state

    def select(self, state: dict, keep_g: torch.Tensor, keep_r: torch.Tensor, slots: torch.Tensor,
               s: int, k: int) -> dict:
        """Keep prompt groups keep_g and computed rows keep_r; steps 0..s-1 are filled.

        slots [A']: the slot (group * k + sample) of each kept row in the kept groups' layout.
        """
        gen = None if state["gen"] is None else []
        for gk, gv in state["gen"] or []:
            nk = torch.zeros(len(keep_r), *gk.shape[1:], dtype=gk.dtype, device=gk.device)
            nv = torch.zeros_like(nk)
            nk[:, :, :s] = gk[:, :, :s].index_select(0, keep_r)
            nv[:, :, :s] = gv[:, :, :s].index_select(0, keep_r)
            gen.append((nk, nv))
        return {
            "prompt": [(pk.index_select(0, keep_g), pv.index_select(0, keep_g))
                       for pk, pv in state["prompt"]],
            "bias": state["bias"].index_select(0, keep_g),
            "gen": gen,
            "slots": None if len(keep_r) == len(keep_g) * k else slots,
            "prefix": state.get("prefix"),
        }

    # -- one decode step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, state: dict, tok: torch.Tensor, pos: torch.Tensor, s: int, k: int, layer: int,
             n_steps: int, logits: bool = True):
        """Feed token s of every computed row.

        Only unfinished rows are computed: A of the B = P * k slots of the live prompt groups,
        state["slots"] [A] says which (None: all of them, A = B). tok, pos: [A];
        state["bias"]: [P, 1, 1, T0] (0 or -inf on padding); state["gen"]: per layer (k, v)
        buffers [A, Hkv, n_steps, hd] (allocated at s = 0), this step writes index s.
        Stops after block `layer` when `logits` is False.
        Returns (logits [A, V] or None, residual after `layer` [A, D]).
        """
        a = tok.shape[0]
        if state["gen"] is None:
            state["gen"] = [
                (torch.zeros(a, self.hkv, n_steps, self.hd, dtype=self.dtype, device=tok.device),
                 torch.zeros(a, self.hkv, n_steps, self.hd, dtype=self.dtype, device=tok.device))
                for _ in range(self.n_layers)
            ]
        prompt_cache, prompt_bias, gen_cache = state["prompt"], state["bias"], state["gen"]
        slots, shared = state.get("slots"), state.get("prefix")
        p = prompt_bias.shape[0]
        b = p * k
        g = self.h // self.hkv
        cos, sin = self._rope(pos[:, None])
        x = F.embedding(tok[:, None], self.embed)  # [A, 1, D]
        feat = None
        for i, lyr in enumerate(self.layers):
            q, kk, vv = self._qkv(lyr, x, cos, sin)  # q [A, H, 1, hd], kk/vv [A, Hkv, 1, hd]
            gk, gv = gen_cache[i]
            gk[:, :, s] = kk[:, :, 0]
            gv[:, :, s] = vv[:, :, 0]
            pk, pv = prompt_cache[i]  # [P, Hkv, T0, hd]
            t0 = pk.shape[2]
            q = q * self.scale
            # Prompt part: all k slots of a prompt against its one cache (finished slots hold
            # zeros and are dropped again right after).
            qs = q if slots is None else q.new_zeros(b, *q.shape[1:]).index_copy_(0, slots, q)
            qp = qs.view(p, k, self.hkv, g, self.hd).transpose(1, 2).reshape(p, self.hkv, k * g, self.hd)
            sp = torch.matmul(qp, pk.transpose(-1, -2)) + prompt_bias  # [P, Hkv, kG, T0]
            sp = sp.view(p, self.hkv, k, g, t0).transpose(1, 2).reshape(b, self.hkv, g, t0)
            if slots is not None:
                sp = sp.index_select(0, slots)  # [A, Hkv, G, T0]
            # Generated part: each row against its own tokens 0..s.
            qg = q.view(a, self.hkv, g, self.hd)
            sg = torch.matmul(qg, gk[:, :, : s + 1].transpose(-1, -2))  # [A, Hkv, G, s+1]
            parts = [sp, sg]
            if shared is not None:  # shared prefix: every row against one cache
                sk, sv = shared[i]  # [1, Hkv, L, hd]
                n_sh = sk.shape[2]
                qx = qg.transpose(0, 1).reshape(self.hkv, a * g, self.hd)
                sx = torch.matmul(qx, sk[0].transpose(-1, -2))  # [Hkv, A G, L]
                parts.insert(0, sx.view(self.hkv, a, g, n_sh).transpose(0, 1))  # [A, Hkv, G, L]
            pr = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
            if shared is not None:
                px, pr = pr.split([n_sh, t0 + s + 1], dim=-1)
                ox = torch.matmul(px.transpose(0, 1).reshape(self.hkv, a * g, n_sh), sv[0])
                ox = ox.view(self.hkv, a, g, self.hd).transpose(0, 1).reshape(a, self.h * self.hd)
            pp, pg = pr.split([t0, s + 1], dim=-1)
            if slots is not None:
                pp = pp.new_zeros(b, *pp.shape[1:]).index_copy_(0, slots, pp)
            pp = pp.reshape(p, k, self.hkv, g, t0).transpose(1, 2).reshape(p, self.hkv, k * g, t0)
            op = torch.matmul(pp, pv)  # [P, Hkv, kG, hd]
            op = op.view(p, self.hkv, k, g, self.hd).transpose(1, 2).reshape(b, self.h * self.hd)
            if slots is not None:
                op = op.index_select(0, slots)  # [A, H hd]
            og = torch.matmul(pg, gv[:, :, : s + 1]).reshape(a, self.h * self.hd)
            o = op + og if shared is None else op + og + ox
            x = x + F.linear(o[:, None], lyr.wo, lyr.bo)
            x = self._mlp(lyr, x)
            if i == layer:
                feat = x[:, 0]
                if not logits:
                    return None, feat
        h = F.rms_norm(x[:, 0], (self.dim,), self.norm, self.eps)
        return F.linear(h, self.lm_head).float(), feat


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


class _StopForward(Exception):
    pass


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
                raise _StopForward

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
        except _StopForward:
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


# -- sampling ------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def row_seeds(seed: int, prompts: list[str], k: int) -> np.ndarray:
    """One 64-bit stream id per (prompt text, sample index): uint64 [P * k]."""
    out = np.empty(len(prompts) * k, dtype=np.uint64)
    for i, text in enumerate(prompts):
        base = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
        b = np.frombuffer(base, dtype=np.uint64)[0]
        out[i * k : (i + 1) * k] = b + np.arange(k, dtype=np.uint64) * _GOLDEN
    return out


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """Counter-based U[0, 1) per row for this step (splitmix64 of seed + step): float64 [B]."""
    with np.errstate(over="ignore"):
        z = seeds + np.uint64(step + 1) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: np.ndarray) -> torch.Tensor:
    """Temperature + nucleus sampling by inverse CDF with the given uniforms.

    logits [B, V] float32, u [B] -> token ids [B]. temperature 0 is argmax.
    """
    if temperature == 0:
        return logits.argmax(-1)
    uu = torch.from_numpy(u).to(logits.device, torch.float64)
    if top_p >= 1.0:  # plain sampling: order does not matter, no sort at all
        z = logits / temperature
        cdf = torch.softmax(z, -1, dtype=torch.float64).cumsum(-1)  # [B, V]
        idx = torch.searchsorted(cdf, (uu * cdf[:, -1])[:, None], right=True)[:, 0]
        return idx.clamp(max=z.shape[-1] - 1)
    # z = logits / temperature is never built whole (a [B, V] pass of its own): dividing by a
    # temperature > 0 keeps the order, so the top logits are z's top entries, and the
    # normaliser is summed over cache-sized row chunks.
    kk = min(TOP_K_PREFILTER, logits.shape[-1])
    vals, ids = logits.topk(kk, dim=-1)  # [B, kk], descending
    vals = vals / temperature  # z's top kk values
    probs = torch.exp(vals.double() - _logsumexp_scaled(logits, temperature, vals[:, :1]).double())
    cum = probs.cumsum(-1)  # [B, kk]
    wide = cum[:, -1] < top_p  # nucleus larger than the prefilter: sort these rows fully
    if bool(wide.any()):
        rows = wide.nonzero()[:, 0]
        fv, fi = (logits[rows] / temperature).sort(dim=-1, descending=True)
        fp = torch.softmax(fv.double(), -1)
        fc = fp.cumsum(-1)
        out = ids[:, 0].clone()
        out[rows] = fi.gather(1, _nucleus_pick(fc, top_p, uu[rows])[:, None])[:, 0]
        keep = (~wide).nonzero()[:, 0]
        if keep.numel():
            out[keep] = ids[keep].gather(1, _nucleus_pick(cum[keep], top_p, uu[keep])[:, None])[:, 0]
        return out
    return ids.gather(1, _nucleus_pick(cum, top_p, uu)[:, None])[:, 0]


LSE_CHUNK_ROWS = 16  # rows of logits per chunk of _logsumexp_scaled (~3 MB at a 49k vocabulary)


def _logsumexp_scaled(logits: torch.Tensor, temperature: float, top: torch.Tensor) -> torch.Tensor:
    """logsumexp(logits / temperature, -1) [B, 1], given top [B, 1] = the row max of that.

    Row chunks small enough to stay in cache; about 4x faster than dividing the [B, V] logits and
    calling torch.logsumexp (each of which passes over all of memory several times)."""
    out = torch.empty_like(top)
    for i in range(0, logits.shape[0], LSE_CHUNK_ROWS):
        j = min(i + LSE_CHUNK_ROWS, logits.shape[0])
        out[i:j] = logits[i:j].div(temperature).sub_(top[i:j]).exp_().sum(-1, keepdim=True)
    return out.log_().add_(top)


def _nucleus_pick(cum: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """cum [R, n] descending-sorted cumulative probs -> chosen column [R] within the nucleus."""
    # Keep column j while the mass before it is < top_p: the smallest set with mass >= top_p.
    n_keep = (cum < top_p).sum(-1) + 1  # [R]
    n_keep = n_keep.clamp(max=cum.shape[-1])
    mass = cum.gather(1, (n_keep - 1)[:, None])[:, 0]
    j = torch.searchsorted(cum, (u * mass)[:, None].to(cum.dtype), right=True)[:, 0]
    return torch.minimum(j, n_keep - 1)


# -- the loop ------------------------------------------------------------------------------------
@dataclass
class RowResult:
    """What the loop produced for one row (turned into `Sample` by the backend)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    feature: np.ndarray | None


@torch.no_grad()
def run_batch(
    dec: FastDecoder,
    prompt_tokens: list[list[int]],
    seed_keys: list[str],
    k: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: list[str],
    seed: int,
    layer: int,
    position: str,
    features: bool,
    eos_ids: set[int],
    detok,
) -> list[list[RowResult]]:
    """Sample k completions for each tokenised prompt in one batch (P * k rows).

    seed_keys name the prompts for seeding; detok(list of id lists) -> list of str.
    """
    dev = dec.device
    p = len(prompt_tokens)
    b = p * k
    # Tokens all prompts start with run once (not the last one: its logits start sampling).
    n_sh = _common_prefix(prompt_tokens) if isinstance(dec, FastDecoder) and p > 1 else 0
    n_sh = n_sh if n_sh >= MIN_SHARED_PREFIX else 0
    prefix = torch.tensor(prompt_tokens[0][:n_sh], dtype=torch.long, device=dev) if n_sh else None
    prompt_tokens = [t[n_sh:] for t in prompt_tokens]
    t0 = max(len(t) for t in prompt_tokens)
    ids = torch.zeros(p, t0, dtype=torch.long)
    valid = torch.zeros(p, t0, dtype=torch.bool)
    for i, t in enumerate(prompt_tokens):  # left padding: every row's next slot is the same
        ids[i, t0 - len(t) :] = torch.tensor(t, dtype=torch.long)
        valid[i, t0 - len(t) :] = True
    ids, valid = ids.to(dev), valid.to(dev)
    if prefix is None:
        logits_p, h_prompt, state = dec.prefill(ids, valid, layer)  # [P, V], [P, D]
    else:
        logits_p, h_prompt, state = dec.prefill(ids, valid, layer, prefix)
    pos0 = (n_sh + valid.sum(-1)).repeat_interleave(k)  # [B] position of completion token 0
    n_steps = int(max_new_tokens)
    feats = torch.zeros(b, n_steps, dec.dim, dtype=torch.float32) if features else None
    tokens = np.zeros((b, n_steps), dtype=np.int64)
    seeds = row_seeds(seed, seed_keys, k)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
    window = max((len(s.encode()) for s in stop), default=0) + 1

    live = np.arange(b)  # original row index of each computed (unfinished) row
    groups = np.arange(p)  # original prompt index of each live prompt group
    logits = logits_p.repeat_interleave(k, 0)  # [A, V]
    active = np.ones(b, dtype=bool)  # indexed by original row
    finish = [""] * b
    by_eos = np.zeros(b, dtype=bool)
    end_step = np.full(b, n_steps, dtype=np.int64)  # EOS / stop step, or n_steps for length
    for s in range(n_steps):
        tok = sample_tokens(logits, temperature, top_p, uniforms(seeds[live], s))
        tok_np = tok.cpu().numpy()
        tokens[live, s] = tok_np
        is_eos = torch.isin(tok, eos).cpu().numpy() if eos.numel() else np.zeros(len(live), bool)
        for r in live[is_eos]:
            active[r], finish[r], end_step[r], by_eos[r] = False, "stop", s, True
        if stop:
            rows = live[~is_eos]
            texts = detok([tokens[r, max(0, s - window + 1) : s + 1].tolist() for r in rows])
            for r, t in zip(rows, texts):
                if any(st in t for st in stop):
                    active[r], finish[r], end_step[r] = False, "stop", s
        last = s == n_steps - 1
        if last:
            for r in live[active[live]]:
                active[r], finish[r] = False, "length"
        if last or not active.any():
            if features and last and any(finish[r] == "length" for r in live):
                _, h = dec.step(state, tok, pos0 + s, s, k, layer, n_steps, logits=False)
                feats[torch.from_numpy(live), s] = h.float().cpu()
            break
        # Drop finished rows (their token s is never fed: nothing after it is kept) and prompt
        # groups with no unfinished row left (their prompt cache is never read again).
        keep = active[live]
        if not keep.all():
            live = live[keep]
            group_live = np.isin(groups, live // k)
            keep_g = np.nonzero(group_live)[0]
            groups = groups[keep_g]
            slots = np.searchsorted(groups, live // k) * k + live % k
            keep_r = torch.from_numpy(np.nonzero(keep)[0]).to(dev)
            state = dec.select(state, torch.from_numpy(keep_g).to(dev), keep_r,
                               torch.from_numpy(slots).to(dev), s, k)
            pos0 = pos0.index_select(0, keep_r)
            tok = tok.index_select(0, keep_r)
        logits, h = dec.step(state, tok, pos0 + s, s, k, layer, n_steps)
        if features:
            feats[torch.from_numpy(live), s] = h.float().cpu()

    h_prompt = h_prompt.cpu() if features else None
    out: list[list[RowResult]] = []
    for i in range(p):
        group = []
        for j in range(k):
            r = i * k + j
            e = int(end_step[r])
            if finish[r] == "length":
                n, text = n_steps, None
            elif by_eos[r]:  # EOS sampled at step e: tokens 0..e-1 kept
                n, text = e, None
            else:  # a stop string ends in token e
                n, text = _cut_at_stop(tokens[r, : e + 1].tolist(), stop, detok)
            ids_r = tokens[r, :n].tolist()
            if text is None:
                text = detok([ids_r])[0]
            feat = None
            if features:
                if n == 0:
                    feat = h_prompt[i]
                elif position == "mean":
                    feat = feats[r, :n].mean(0)
                else:
                    feat = feats[r, n - 1]
                feat = feat.numpy().copy()
            group.append(RowResult(text, ids_r, finish[r], feat))
        out.append(group)
    return out


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all sequences share, leaving each at least one token."""
    n = min(len(t) for t in seqs) - 1
    first = seqs[0]
    for t in seqs[1:]:
        i = 0
        while i < n and t[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


def _cut_at_stop(ids: list[int], stop: list[str], detok) -> tuple[int, str]:
    """Cut before the first stop string: (number of tokens fully kept, kept text)."""
    full = detok([ids])[0]
    cut = min(i for i in (full.find(st) for st in stop) if i >= 0)
    text = full[:cut]
    n = len(ids) - 1  # the last token holds the end of the stop string
    while n > 0 and len(detok([ids[:n]])[0]) > cut:
        n -= 1
    return n, text
