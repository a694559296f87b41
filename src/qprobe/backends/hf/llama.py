"""qprobe's own forward for Llama-family decoders (Llama, Mistral, Qwen2): `FastDecoder`.

Why not transformers' forward: for best-of-k sampling the k rows of a prompt share its prompt,
so here

- each prompt is prefilled once; its KV cache is *shared* by its k rows (never copied k times):
  decode attention scores the prompt part per prompt group and the generated part per row, and
  joins them in one softmax;
- the generated part lives in a preallocated KV buffer (no concatenation);
- tokens every prompt of a batch starts with (a few-shot prefix, a chat template's system
  prompt) are run once and their cache is shared by all rows;
- finished rows leave: `select` drops their generated cache and, once a prompt has no row left,
  its prompt cache; the remaining rows address their prompt through slots (group * k + sample);
- projections are fused (q|k|v, gate|up) so each step is a few large matmuls.

Shapes: P prompts, k samples each, B = P * k rows, A computed (unfinished) rows, T0 padded
prompt length, D hidden size, H query heads, Hkv key/value heads, G = H // Hkv, hd head dim,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
PREFILL_TOKENS = 4096  # prompt tokens per prefill chunk (bounds activation memory)


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
    def merge(self, state: dict, new: dict, k: int) -> dict:
        """The state of a running decode with the prompts of `new` (a prefill without a shared
        prefix) joined: their groups after the running ones, their k rows each after the
        computed rows (continuous batching). Prompt caches are left-padded to the longer of the
        two prompt lengths (the padding masked by the bias)."""
        if state.get("prefix") is not None or new.get("prefix") is not None:
            raise ValueError("merge: a decode with a shared prefix cannot take new prompts")
        t_a, t_b = state["bias"].shape[-1], new["bias"].shape[-1]
        t = max(t_a, t_b)

        def pad(x: torch.Tensor, have: int, dim: int, fill: float) -> torch.Tensor:
            if have == t:
                return x
            shape = list(x.shape)
            shape[dim] = t - have
            return torch.cat([x.new_full(shape, fill), x], dim=dim)

        prompt = [(torch.cat([pad(ak, t_a, 2, 0.0), pad(bk, t_b, 2, 0.0)]),
                   torch.cat([pad(av, t_a, 2, 0.0), pad(bv, t_b, 2, 0.0)]))
                  for (ak, av), (bk, bv) in zip(state["prompt"], new["prompt"])]
        bias = torch.cat([pad(state["bias"], t_a, 3, float("-inf")),
                          pad(new["bias"], t_b, 3, float("-inf"))])
        p_a, p_b = state["bias"].shape[0], new["bias"].shape[0]
        dev = bias.device
        old = state.get("slots")
        old = torch.arange(p_a * k, device=dev) if old is None else old
        slots = torch.cat([old, p_a * k + torch.arange(p_b * k, device=dev)])
        gen = state["gen"]
        if gen is not None:
            gen = [tuple(torch.cat([g, g.new_zeros(p_b * k, *g.shape[1:])]) for g in kv)
                   for kv in gen]
        return {"prompt": prompt, "bias": bias, "gen": gen, "prefix": None,
                "slots": None if len(slots) == (p_a + p_b) * k else slots}

    @torch.no_grad()
    def step(self, state: dict, tok: torch.Tensor, pos: torch.Tensor, s: int | torch.Tensor,
             k: int, layer: int, n_steps: int, logits: bool = True):
        """Feed token s of every computed row.

        Only unfinished rows are computed: A of the B = P * k slots of the live prompt groups,
        state["slots"] [A] says which (None: all of them, A = B). tok, pos: [A];
        state["bias"]: [P, 1, 1, T0] (0 or -inf on padding); state["gen"]: per layer (k, v)
        buffers [A, Hkv, n_steps, hd] (allocated at s = 0), this step writes index s.
        s: one step for every row, or each row's own step [A] (int64; continuous batching:
        rows that joined later are at earlier steps).
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
        shared = state.get("prefix")
        cos, sin = self._rope(pos[:, None])
        x = F.embedding(tok[:, None], self.embed)  # [A, 1, D]
        feat = None
        rows = torch.arange(a, device=tok.device) if torch.is_tensor(s) else None
        for i, lyr in enumerate(self.layers):
            q, kk, vv = self._qkv(lyr, x, cos, sin)  # q [A, H, 1, hd], kk/vv [A, Hkv, 1, hd]
            gk, gv = state["gen"][i]
            if rows is None:
                gk[:, :, s] = kk[:, :, 0]
                gv[:, :, s] = vv[:, :, 0]
            else:
                gk[rows, :, s] = kk[:, :, 0]
                gv[rows, :, s] = vv[:, :, 0]
            o = self._attend(q * self.scale, state["prompt"][i], (gk, gv),
                             None if shared is None else shared[i], state["bias"],
                             state.get("slots"), s, k)  # [A, H hd]
            x = x + F.linear(o[:, None], lyr.wo, lyr.bo)
            x = self._mlp(lyr, x)
            if i == layer:
                feat = x[:, 0]
                if not logits:
                    return None, feat
        h = F.rms_norm(x[:, 0], (self.dim,), self.norm, self.eps)
        return F.linear(h, self.lm_head).float(), feat

    def _attend(self, q: torch.Tensor, prompt_kv, gen_kv, shared_kv, prompt_bias: torch.Tensor,
                slots: torch.Tensor | None, s: int | torch.Tensor, k: int) -> torch.Tensor:
        """One layer's decode attention over [shared prefix | prompt | generated 0..s], one softmax.

        q [A, H, 1, hd] (already scaled); prompt_kv: (k, v) [P, Hkv, T0, hd]; gen_kv: (k, v)
        [A, Hkv, n_steps, hd]; shared_kv: (k, v) [1, Hkv, L, hd] or None. Returns [A, H * hd].
        s: each row's own step [A] masks the generated positions after it.
        """
        a = q.shape[0]
        gen_mask = None
        if torch.is_tensor(s):
            steps, s = s, int(s.max())
            gen_mask = torch.zeros(a, 1, 1, s + 1, dtype=q.dtype, device=q.device)
            gen_mask.masked_fill_((torch.arange(s + 1, device=q.device)[None, :]
                                   > steps[:, None])[:, None, None, :], float("-inf"))
        pk, pv = prompt_kv
        gk, gv = gen_kv
        p, t0 = prompt_bias.shape[0], pk.shape[2]
        b, g = p * k, self.h // self.hkv
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
        if gen_mask is not None:
            sg = sg + gen_mask
        parts = [sp, sg]
        if shared_kv is not None:  # shared prefix: every row against one cache
            sk, sv = shared_kv  # [1, Hkv, L, hd]
            n_sh = sk.shape[2]
            qx = qg.transpose(0, 1).reshape(self.hkv, a * g, self.hd)
            sx = torch.matmul(qx, sk[0].transpose(-1, -2))  # [Hkv, A G, L]
            parts.insert(0, sx.view(self.hkv, a, g, n_sh).transpose(0, 1))  # [A, Hkv, G, L]
        pr = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
        if shared_kv is not None:
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
        return op + og if shared_kv is None else op + og + ox
