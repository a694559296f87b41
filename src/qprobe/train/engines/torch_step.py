"""The torch engines: the fused linear step with a hand-written Adam, and plain autograd.

The fused linear step. A linear probe's per-row gradient dL/ds_i depends only on the scores of
the row's own unit (q/ce: the row, pg: its group, bt: its pair, dpo: its prompt), and the layout
keeps units contiguous. So a batch is processed in cache-sized blocks of whole units: s = X_blk w,
then dL/ds of the block's units (the objective's closed form, `Objective.grad`), then
grad += X_blk^T dL/ds while X_blk is still in cache: one pass over the batch in memory per step
instead of two. Half-precision features are upcast block by block into a float32 buffer, so all
arithmetic is float32 whatever the storage. This is the reference and the fallback of linfit.c
(engines/native.py), which runs the same step without Python between steps.

Autograd trains whatever the fused step cannot: MLP probes, and objectives without a closed-form
gradient (any differentiable `Objective.loss`), with torch's Adam.
"""

from __future__ import annotations

import bisect
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qprobe.train import objectives
from qprobe.train.config import TrainConfig
from qprobe.train.data import Batch
from qprobe.train.threads import SHARDS

BLOCK_BYTES = 6 << 20  # float32 bytes of one block, 384 rows at 4096 dims (tuned)


@dataclass
class Block:
    """Rows [start, end) of a batch and the index tensors of its units, all batch-relative;
    `pad` (the slot after the widest batch) holds score -inf and absorbs padding gradients."""

    start: int
    end: int
    rewards: torch.Tensor | None = None  # rows: [n]; groups: [G, m] (padding 0)
    index: torch.Tensor | None = None  # groups: [G*m] rows of the groups; prompts: [P*k] others
    pos: torch.Tensor | None = None  # groups: [n] position of each row in the flat [G*m] matrix
    width: int = 0  # groups: m; prompts: k (others per pair)
    pair: torch.Tensor | None = None  # prompts: [P*2] chosen, rejected, chosen, ...
    targets: torch.Tensor | None = None  # prompts: [P*2 + P*k] pair, then index


def make_blocks(layout: str, b: Batch, rows: int, pad: int, shards: int = 1
                ) -> list[list[Block]]:
    """Cut a batch of the named layout into `shards` runs of about equal rows, each into blocks
    of at most `rows` rows (or one unit); no block splits a unit. Returns each shard's blocks."""
    starts = b.unit_starts()  # [units + 1]
    n_units = len(starts) - 1
    shard_starts = b.shard_units(shards)
    unit_cuts = [0]  # first unit of each block; a block also ends where a shard starts
    for i in range(1, n_units):
        if i in shard_starts or starts[i + 1] - starts[unit_cuts[-1]] > rows:
            unit_cuts.append(i)
    unit_cuts.append(n_units)
    bounds = [int(starts[u]) for u in unit_cuts]  # block j: rows [bounds[j], bounds[j + 1])
    shard_of = [bisect.bisect_right(shard_starts, u) - 1 for u in unit_cuts[:-1]]
    out = []
    pair_at = 0
    for j in range(len(bounds) - 1):
        s, e = bounds[j], bounds[j + 1]
        blk = Block(s, e)
        if layout == "rows":
            blk.rewards = b.rewards[s:e]
        elif layout == "groups":
            g0, g1 = unit_cuts[j], unit_cuts[j + 1]
            idx = b.index[g0:g1]  # [G, m]
            blk.index = torch.where(idx >= 0, idx, pad).reshape(-1)
            blk.width = idx.shape[1]
            blk.pos = torch.nonzero(blk.index != pad).squeeze(1)  # [n] rows in order
            assert torch.equal(blk.index[blk.pos], torch.arange(s, e))
            blk.rewards = b.rewards[g0:g1]
        elif layout == "prompts":
            pair_end = pair_at
            while pair_end < len(b.chosen) and int(b.chosen[pair_end]) < e:
                pair_end += 1
            ch, rj = b.chosen[pair_at:pair_end], b.rejected[pair_at:pair_end]  # [P]
            oth = b.index[pair_at:pair_end]  # [P, k]
            assert bool(((ch >= s) & (rj >= s) & (rj < e)).all())
            assert bool(((oth < 0) | ((oth >= s) & (oth < e))).all())
            blk.pair = torch.stack([ch, rj], 1).reshape(-1)
            blk.index = torch.where(oth >= 0, oth, pad).reshape(-1)
            blk.targets = torch.cat([blk.pair, blk.index])
            blk.width = oth.shape[1]
            pair_at = pair_end
        out.append(blk)
    per_shard: list[list[Block]] = [[] for _ in range(shards)]
    for blk, j in zip(out, shard_of):
        per_shard[j].append(blk)
    return per_shard


class _Shard:
    """One thread's share of the fused step: its own buffers."""

    def __init__(self, most: int, dim: int, pad: int, dtype: torch.dtype, upcast: bool):
        # [R, D] float32 copy of a half-precision block
        self.buf = torch.empty((most, dim), dtype=dtype) if upcast else None
        self.s = torch.full((pad + 1,), -math.inf, dtype=dtype)  # [B + 1] scores; [pad] = -inf
        self.g = torch.zeros(pad + 1, dtype=dtype)  # [B + 1] dL/ds; [pad] collects padding
        self.gw = torch.zeros(dim, dtype=dtype)  # [D] this shard's weight gradient


class FusedLinear:
    """Blocks and preallocated buffers of the fused step for one training run.

    Every batch is cut into SHARDS runs of whole units of about equal size. Each shard's weight
    gradient, loss and bias gradient are computed on their own and then summed in shard order,
    so the result does not depend on how many threads run the shards: with `threads` = 2 they run
    at the same time (the step is bound by memory bandwidth, and two cores stream more than
    one); with 1 they run one after the other, bit for bit the same.

    float16 features are upcast block by block into a float32 buffer (blocks of up to BLOCK_BYTES
    of float32)."""

    def __init__(self, cfg: TrainConfig, dim: int, batches: list[Batch],
                 block_rows: int | None = None, dtype: torch.dtype = torch.float32,
                 threads: int = 1, half: bool = False):
        self.cfg = cfg
        self.objective = objectives.get(cfg.objective)
        assert self.objective.grad is not None, "the fused step needs a closed-form gradient"
        if block_rows is None:
            block_rows = BLOCK_BYTES // (4 * dim)
        rows = max(8, block_rows)
        pad = max(b.end - b.start for b in batches)
        self.blocks = {id(b): make_blocks(self.objective.layout, b, rows, pad, SHARDS)
                       for b in batches}  # batch -> its blocks per shard
        most = max((blk.end - blk.start for shards in self.blocks.values() for sh in shards
                    for blk in sh), default=1)
        self.shards = [_Shard(most, dim, pad, dtype, half) for _ in range(SHARDS)]
        self.pool = None
        if threads > 1:  # the other shards run on worker threads (torch ops and ctypes calls
            # release the GIL); each op inside runs on its caller's thread only
            self.pool = ThreadPoolExecutor(SHARDS - 1, initializer=torch.set_num_threads,
                                           initargs=(1,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _run(self, j: int, x: torch.Tensor, b: Batch, w: torch.Tensor, bias: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shard j of batch b: its weight gradient into shards[j].gw; returns (loss / scale,
        the sum of its dL/ds (the bias gradient) if the objective fits a bias)."""
        sh = self.shards[j]
        sh.gw.zero_()
        losses = []
        blocks = self.blocks[id(b)][j]
        for blk in blocks:
            xb = x[b.start + blk.start:b.start + blk.end]  # [R, D]
            s, g = sh.s[blk.start:blk.end], sh.g[blk.start:blk.end]  # [R]
            if sh.buf is not None:
                xb = sh.buf[: len(xb)].copy_(xb)
            torch.addmv(bias, xb, w, out=s)
            losses.append(self.objective.grad(self.cfg, sh.s, blk, scale, sh.g))
            torch.addmv(sh.gw, xb.t(), g, out=sh.gw)
        if not losses:
            return torch.zeros((), dtype=sh.s.dtype), None
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        gsum = None
        if self.objective.fits_bias:
            gsum = sh.g[blocks[0].start:blocks[-1].end].sum()
        return total, gsum

    def step(self, layer: torch.nn.Linear, x: torch.Tensor, b: Batch) -> torch.Tensor:
        """Set layer's .grad for batch b (rows of x) in one pass; returns the batch loss."""
        w, bias = layer.weight.detach()[0], layer.bias.detach()  # [D], [1]
        scale = 1.0 / b.terms
        if self.pool is None:
            parts = [self._run(j, x, b, w, bias, scale) for j in range(SHARDS)]
        else:
            futures = [self.pool.submit(self._run, j, x, b, w, bias, scale)
                       for j in range(1, SHARDS)]
            parts = [self._run(0, x, b, w, bias, scale)] + [f.result() for f in futures]
        gw = self.shards[0].gw.clone()
        total = parts[0][0]
        for sh, p in zip(self.shards[1:], parts[1:]):  # in shard order, whatever ran where
            gw += sh.gw
            total = total + p[0]
        layer.weight.grad = gw.unsqueeze(0)
        if self.objective.fits_bias:
            gsums = [p[1] for p in parts if p[1] is not None]
            gsum = gsums[0]
            for more in gsums[1:]:
                gsum = gsum + more
            layer.bias.grad = gsum.reshape(1)
        else:  # exactly 0 (a sum of rounding errors here, which Adam would make lr-sized steps)
            layer.bias.grad = torch.zeros_like(bias)
        if self.objective.loss_offset is not None:
            total = total + self.objective.loss_offset(b)  # pg: + b per group
        return total * scale


class Adam:
    """Adam (or AdamW: decoupled weight decay) as torch.optim.Adam(W) computes it, in six in-place
    ops per tensor. For a linear probe torch's optimizer costs ~190 us of Python per step on a
    2-core machine, as much as the arithmetic of a whole 896-dim step."""

    def __init__(self, params: Any, lr: float, weight_decay: float, decoupled: bool,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd, self.decoupled, self.betas, self.eps = lr, weight_decay, decoupled, \
            betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]  # first moments
        self.v = [torch.zeros_like(p) for p in self.params]  # second moments
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        step = self.lr / (1 - b1 ** self.t)
        root_bc2 = math.sqrt(1 - b2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if self.wd and self.decoupled:
                p.mul_(1 - self.lr * self.wd)
            elif self.wd:
                g = g.add(p, alpha=self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(root_bc2).add_(self.eps), value=-step)


class TorchLinear:
    """A linear probe's steps in torch: the fused step and `Adam`, one batch at a time."""

    def __init__(self, cfg: TrainConfig, net: torch.nn.Sequential, x: torch.Tensor,
                 batches: list[Batch], threads: int):
        self.layer, self.x, self.batches = net[0], x, batches
        self.adam = Adam(net.parameters(), cfg.lr, cfg.weight_decay, cfg.optimizer == "adamw")
        self.fused = FusedLinear(cfg, x.shape[1], batches, threads=threads,
                                 half=x.dtype == torch.float16)

    def run(self, order: np.ndarray) -> float:
        """One step on each batch in `order`; returns the summed loss."""
        total = torch.zeros(())
        for i in order:
            total += self.fused.step(self.layer, self.x, self.batches[i]).detach()
            self.adam.step()
        return float(total)

    def close(self) -> None:
        self.fused.close()


class Autograd:
    """Any probe and any differentiable objective: autograd through the probe and torch's Adam."""

    def __init__(self, cfg: TrainConfig, net: torch.nn.Module, x: torch.Tensor,
                 batches: list[Batch]):
        self.cfg, self.net, self.x, self.batches = cfg, net, x, batches
        self.loss = objectives.get(cfg.objective).loss
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel per step instead of a dozen small ops (the probe has few parameters)
        self.opt = opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)

    def run(self, order: np.ndarray) -> float:
        """One step on each batch in `order`; returns the summed loss."""
        total = torch.zeros(())
        for i in order:
            b = self.batches[i]
            xb = self.x[b.start:b.end].float()  # [B, D], a view unless kept in float16
            loss = self.loss(self.cfg, self.net(xb).squeeze(-1), b)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
        return float(total)

    def close(self) -> None:
        pass
