"""Token-level reward-guided decoding (RAD and ARM) inside the local decode loop.

At every step, for each live row: take the base model's top-k next tokens, score each candidate
with a reward head (`heads.RewardHead`), and sample from

    softmax(logits + beta * r)   over the top-k,  probability 0 elsewhere,

with r = clamp(link(raw), lo, hi) (1 - r with `inverse`; [lo, hi] = [0, 1] unless given, none
for a head trained from preference pairs). Sampling then goes through the same
function as unguided top-k sampling (`sampling.sample_candidates`), so beta = 0 gives exactly the
samples of unguided top-k decoding with the same seed.

Where the candidates' scores come from (the cost per generated token, k = top_k):

- ARM, own hidden state: the head reads the base model's feature-layer hidden state that the
  decode loop computed anyway: no extra forward at all;
- ARM, separate trunk: one trunk token-forward per row (the chosen token), KV-cached;
- RAD (separate trunk, or the base model itself + head): k trunk token-forwards per row, one
  batched KV-cached forward of the k candidates; the chosen candidate's keys/values are then
  copied to the row's other k - 1 slots (RAD's "select and broadcast" of the cache).

A trunk runs only up to the head's block (`layer`), never to the logits. Everything is batched
over rows and candidates; no Python loop over rows.

Shapes: A live rows, k candidates per row (top_k), D trunk width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qprobe.backends.hf.loop import Candidates, LiveRows, _prefill
from qprobe.errors import QProbeError
from qprobe.features import chat_identity
from qprobe.policy.heads import RewardHead, tokenizer_identity

if TYPE_CHECKING:
    from qprobe.backends.base import Sample, SamplingParams
    from qprobe.backends.hf.model import HFLanguageModel

RAD_BATCH_ROWS = 1024  # rows x candidates a RAD trunk step computes at once (KV memory bound)


@dataclass
class GuideConfig:
    """How reward guidance changes each step's next-token distribution."""

    beta: float = field(default=1.0, metadata={
        "help": "reward weight: logits + beta * r on the top-k (0: unguided top-k sampling)"})
    top_k: int = field(default=20, metadata={
        "help": "candidates scored per step (RAD's k); every other token gets probability 0"})
    inverse: bool = field(default=False, metadata={
        "help": "steer away from the reward: use 1 - r"})
    clamp_min: float | None = field(default=None, metadata={
        "help": "rewards are clamped to at least this (default: 0, or no bound for a head "
                "trained from preference pairs, whose token scores are unbounded log-odds)"})
    clamp_max: float | None = field(default=None, metadata={
        "help": "rewards are clamped to at most this (default: 1, or no bound for a head "
                "trained from preference pairs)"})

    def __post_init__(self) -> None:
        if not np.isfinite(self.beta):
            raise QProbeError(f"guide: beta must be finite, got {self.beta}")
        if int(self.top_k) < 1:
            raise QProbeError(f"guide: top_k must be >= 1, got {self.top_k}")
        if (self.clamp_min is not None and self.clamp_max is not None
                and not self.clamp_min <= self.clamp_max):
            raise QProbeError(f"guide: clamp_min {self.clamp_min} > clamp_max {self.clamp_max}")

    def bounds(self, head: RewardHead) -> tuple[float | None, float | None]:
        """The clamp for this head: as given, else [0, 1] (rewards), or none for a head trained
        from preference pairs (`train-head --pairs`: summed token scores, unbounded)."""
        from_pairs = bool(head.info.get("training", {}).get("pairs"))
        lo, hi = (None, None) if from_pairs else (0.0, 1.0)
        return (lo if self.clamp_min is None else self.clamp_min,
                hi if self.clamp_max is None else self.clamp_max)


def shaped_reward(head: RewardHead, raw: torch.Tensor, cfg: GuideConfig) -> torch.Tensor:
    """r in the head's clamp (`GuideConfig.bounds`) from its raw output (1 - r with `inverse`)."""
    lo, hi = cfg.bounds(head)
    r = head.reward(raw)
    if lo is not None or hi is not None:
        r = r.clamp(lo, hi)
    return 1.0 - r if cfg.inverse else r


def guided_candidates(logits: torch.Tensor, top_k: int, beta: float,
                      reward: Callable[[torch.Tensor], torch.Tensor]) -> Candidates:
    """Top-k of logits [A, V] with beta * reward(ids) [A, k] added: what the loop samples from.

    The top-k is taken exactly as unguided top-k sampling takes it (`logits.topk`), so beta = 0
    leaves the candidates and their logits bit for bit as they were."""
    vals, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # [A, k]
    return Candidates(ids, vals + beta * reward(ids))


class KVTrunk:
    """A reward model's trunk run beside the decode loop, on the same token ids, KV-cached.

    width 1 (ARM on a separate trunk): `prefix_hidden` feeds each row's last chosen token and
    returns the prefix's hidden state. width k (RAD): `candidate_hidden` feeds the k candidates of
    every row in one batch (slots row * k + j) and returns their hidden states; at the next step
    the chosen candidate's keys/values are copied into the row's other slots. Rows that the loop
    dropped (finished) are dropped here too. `calls` counts trunk token-forwards.
    """

    def __init__(self, dec, layer: int, k: int, width: int, n_steps: int,
                 prompt_ids: Callable[[int], list[int]]) -> None:
        self.dec, self.layer, self.k, self.width, self.n_steps = dec, layer, k, width, n_steps
        self.prompt_ids = prompt_ids
        self.calls = 0  # token-forwards of decode steps
        self.prefill_tokens = 0
        self.state: dict | None = None

    def _start(self, rows: LiveRows) -> torch.Tensor:
        """Prefill this batch's prompts (every row is live at step 0); returns h [P, D]."""
        prompts = np.unique(rows.prompt)
        self.offset = int(prompts[0])
        ids = [self.prompt_ids(int(i)) for i in prompts]
        self.prefill_tokens += sum(len(t) for t in ids)
        _, h_prompt, self.state, self.pos0 = _prefill(self.dec, ids, self.k * self.width, self.layer)
        self.live = np.arange(len(prompts) * self.k)  # original row of each live row
        self.groups = np.arange(len(prompts))
        self.prev_ids: torch.Tensor | None = None
        return h_prompt

    def _compact(self, rows: LiveRows, filled: int) -> None:
        """Drop the rows the loop dropped since the last call (gen positions < filled are kept)."""
        live = (rows.prompt - self.offset) * self.k + rows.sample
        if len(live) == len(self.live):
            return
        keep = np.isin(self.live, live)
        idx = np.nonzero(keep)[0]
        self.live = self.live[keep]
        keep_g = np.nonzero(np.isin(self.groups, self.live // self.k))[0]
        self.groups = self.groups[keep_g]
        w, kk = self.width, self.k * self.width
        keep_r = (idx[:, None] * w + np.arange(w)).reshape(-1)
        slots = ((np.searchsorted(self.groups, self.live // self.k) * kk
                  + (self.live % self.k) * w)[:, None] + np.arange(w)).reshape(-1)
        dev = self.dec.device
        self.state = self.dec.select(self.state, torch.from_numpy(keep_g).to(dev),
                                     torch.from_numpy(keep_r).to(dev),
                                     torch.from_numpy(slots).to(dev), filled, kk)
        self.pos0 = self.pos0.index_select(0, torch.from_numpy(keep_r).to(dev))
        if self.prev_ids is not None:
            self.prev_ids = self.prev_ids.index_select(0, torch.from_numpy(idx).to(dev))

    def prefix_hidden(self, step: int, rows: LiveRows) -> torch.Tensor:
        """Hidden state [A, D] of each row's prefix (prompt + tokens so far): width 1."""
        if step == 0:
            return self._start(rows).repeat_interleave(self.k, 0)
        self._compact(rows, step - 1)
        tok = torch.from_numpy(np.ascontiguousarray(rows.tokens[:, step - 1])).to(self.dec.device)
        _, h = self.dec.step(self.state, tok, self.pos0 + step - 1, step - 1, self.k, self.layer,
                             self.n_steps, logits=False)
        self.calls += len(tok)
        return h

    def candidate_hidden(self, step: int, rows: LiveRows, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [A, k, D] of prefix + each candidate ids [A, k]: width k."""
        a, w = ids.shape
        if step == 0:
            self._start(rows)
        else:
            self._compact(rows, step)
            chosen = torch.from_numpy(np.ascontiguousarray(rows.tokens[:, step - 1]))
            hit = self.prev_ids == chosen.to(ids.device)[:, None]  # [A, k]
            if not bool(hit.any(1).all()):
                raise RuntimeError("guided decoding: a sampled token was not among the candidates")
            src = torch.arange(a, device=ids.device) * w + hit.int().argmax(1)  # [A]
            for gk, gv in self.state["gen"][: self.layer + 1]:  # [A k, Hkv, n_steps, hd]
                gk[:, :, step - 1] = gk[src, :, step - 1].repeat_interleave(w, 0)
                gv[:, :, step - 1] = gv[src, :, step - 1].repeat_interleave(w, 0)
        _, h = self.dec.step(self.state, ids.reshape(-1), self.pos0 + step, step, self.k * w,
                             self.layer, self.n_steps, logits=False)
        self.prev_ids = ids
        self.calls += a * w
        return h.view(a, w, -1)


class GuidedHook:
    """The decode loop's `StepHook` for one `sample` call: top-k, score, add beta * r.

    scorer(step, hidden [A, D], ids [A, k], rows) -> raw scores [A, k]; see `head_scorer`."""

    def __init__(self, cfg: GuideConfig, head: RewardHead,
                 scorer: Callable[[int, torch.Tensor, torch.Tensor, LiveRows], torch.Tensor]
                 ) -> None:
        self.cfg, self.head, self.scorer = cfg, head, scorer
        self.rows_scored = 0  # live rows over all steps (= tokens decoded)

    def __call__(self, step: int, hidden: torch.Tensor, logits: torch.Tensor, rows: LiveRows
                 ) -> Candidates:
        self.rows_scored += len(logits)

        def reward(ids: torch.Tensor) -> torch.Tensor:
            raw = self.scorer(step, hidden, ids, rows)
            return shaped_reward(self.head, raw, self.cfg).to(logits.dtype)

        return guided_candidates(logits, self.cfg.top_k, self.cfg.beta, reward)


def head_scorer(head: RewardHead, trunk: KVTrunk | None):
    """The scorer of a head: ARM on the hook's hidden state (trunk None) or a trunk's prefix
    state; RAD on the trunk's states of prefix + each candidate."""
    if head.kind == "arm":
        if trunk is None:
            return lambda step, hidden, ids, rows: head.arm_raw(hidden, ids)
        return lambda step, hidden, ids, rows: head.arm_raw(trunk.prefix_hidden(step, rows), ids)
    if trunk is None:
        raise QProbeError("guide: a rad head needs a trunk to run the candidates through")
    return lambda step, hidden, ids, rows: head.rad_raw(trunk.candidate_hidden(step, rows, ids))


class GuidedSampler:
    """Reward-guided sampling from a local model (`HFLanguageModel`) with a `RewardHead`.

    trunk: the reward model as (transformers model, tokenizer, identity), when the head was
    trained on another model's hidden states; None when it reads the sampling model's own (its
    feature spec names that model). An ARM head on the own model at the loop's feature block
    costs no extra forward (`own`); at another block the model runs as its own trunk beside the
    loop, up to that block. A RAD head always runs a trunk on the k candidates.

        sampler = GuidedSampler(model, RewardHead.load("heads/arm"), GuideConfig(beta=5))
        samples = sampler.sample(prompts, k=4, params)    # like model.sample
    """

    def __init__(self, model: HFLanguageModel, head: RewardHead, cfg: GuideConfig,
                 trunk: tuple[Any, Any, str] | None = None) -> None:
        from qprobe.backends.hf.generic import GenericDecoder, decoder_blocks
        from qprobe.backends.hf.llama import FastDecoder, supports

        self.model, self.head, self.cfg = model, head, cfg
        spec = head.feature_spec
        if spec is None:
            raise QProbeError("guide: the head has no feature spec (which model and layer it reads)")
        own_name = model._spec.model
        if trunk is None:
            head.check_model(model.tok.tokenizer, int(model.model.config.hidden_size), "guide")
            if spec.model != own_name:
                raise QProbeError(
                    f"guide: the head reads hidden states of {spec.model!r}, not of the sampling "
                    f"model {own_name!r}; give its reward model (--reward-model)")
            if not 0 <= spec.layer < model.n_layers:
                raise QProbeError(f"guide: the head reads block {spec.layer}; the model has "
                                  f"{model.n_layers}")
            # The model is its own reward trunk; at the loop's feature block an ARM head reads
            # the state the loop computes anyway, at another block the trunk runs beside it.
            self.dec, hf = model._dec, model.model
            self.own = spec.layer == model.layer
        else:
            hf, tokenizer, identity = trunk
            ident = chat_identity(identity, model.chat)
            if ident != spec.model:
                raise QProbeError(f"guide: the head was trained on {spec.model!r}; the reward "
                                  f"model given is {ident!r}")
            head.check_model(tokenizer, int(hf.config.hidden_size), "guide (reward model)")
            if tokenizer_identity(tokenizer) != tokenizer_identity(model.tok.tokenizer):
                raise QProbeError("guide: the reward model's tokenizer is not the sampling model's")
            n_layers = len(decoder_blocks(hf))
            if not 0 <= spec.layer < n_layers:
                raise QProbeError(f"guide: the head reads block {spec.layer}; the reward model "
                                  f"has {n_layers}")
            self.dec = FastDecoder(hf) if supports(hf) else GenericDecoder(hf)
            self.own = False
        if head.kind == "rad" and not isinstance(self.dec, FastDecoder):
            raise QProbeError("guide: RAD needs a Llama-family reward model (llama, mistral, "
                              "qwen2) to share the prompt cache over the candidates")
        self.head = head = head.to(self.dec.device)
        head.bind(hf.get_output_embeddings().weight.detach())
        self.calls = 0  # reward-trunk token-forwards during decoding (prompt prefills apart)
        self.prefill_tokens = 0
        self.tokens = 0  # tokens decoded (live rows over all steps)

    @property
    def method(self) -> str:
        return f"{self.head.kind}-{'own' if self.own else 'trunk'}"

    def sample(self, prompts: list[str], k: int, params: SamplingParams, *,
               observe=None) -> list[list[Sample]]:
        """k guided samples per prompt (as `HFLanguageModel.sample`; `observe` sees each step's
        tokens as they are decided, see `loop.StepObserver`)."""
        trunk = None
        width = self.cfg.top_k if self.head.kind == "rad" else 1
        if self.head.kind == "rad" or not self.own:
            trunk = KVTrunk(self.dec, self.head.feature_spec.layer, k, width,
                            int(params.max_new_tokens),
                            lambda i: self.model.tok.prompt_ids(prompts[i]))
        hook = GuidedHook(self.cfg, self.head, head_scorer(self.head, trunk))
        rows = None
        if self.head.kind == "rad":
            rows = min(self.model.max_batch_rows, max(k, RAD_BATCH_ROWS // width))
        with torch.no_grad():
            out = self.model.sample(prompts, k, params, hook=hook, batch_rows=rows, observe=observe)
        if trunk is not None:
            self.calls += trunk.calls
            self.prefill_tokens += trunk.prefill_tokens
        self.tokens += hook.rows_scored
        return out

    def cost(self) -> dict[str, float]:
        """Reward-model token-forwards per decoded token so far (0 for ARM on the own state)."""
        return {"reward_calls_per_token": self.calls / max(self.tokens, 1),
                "tokens": self.tokens, "reward_calls": self.calls}
