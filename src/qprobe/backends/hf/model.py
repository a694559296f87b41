"""The local backend: a Hugging Face transformers causal LM (hub id, folder or GGUF file).

`load_hf` loads it; `HFLanguageModel.sample` runs qprobe's own decode loop (`loop.py`, with
`llama.FastDecoder` or `generic.GenericDecoder`: shared prompt cache, preallocated KV buffers,
cheap top-p, features and log-probabilities captured in flight, an optional step hook).
`HFEmbedder` computes the same features for given (prompt, completion) pairs with one batched
transformers forward pass that stops after the feature layer, which is also how the decode loop
is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe import models
from qprobe.backends.base import Embedder, LanguageModel, Sample, SamplingParams
from qprobe.backends.hf.generic import GenericDecoder, StopForward, decoder_blocks
from qprobe.backends.hf.llama import FastDecoder, supports
from qprobe.backends.hf.loop import StepHook, StepObserver, run_batch
from qprobe.backends.hf.tokenizer import PromptTokenizer
from qprobe.errors import QProbeError
from qprobe.features import FeatureSpec, chat_identity

PAPER_DEPTH = 26 / 32  # the paper read block 26 of Code-Llama-7B's 32


def default_layer(n_layers: int) -> int:
    """0-based index of the block at about 80% depth (the paper's 26 of 32 -> index 25)."""
    return max(0, round(n_layers * PAPER_DEPTH) - 1)


def resolve_layer(layer: int | None, n_layers: int) -> int:
    """None -> default depth; negative counts from the top (-1 = last block)."""
    if layer is None:
        return default_layer(n_layers)
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise QProbeError(f"layer {layer} is out of range for a model with {n_layers} blocks")
    return idx


def default_batch_rows(model) -> int:
    """Rows to decode at once when the caller does not say.

    A decode step is a few [rows, D] x [D, N] matmuls. On this project's 2-core CPU they reach
    ~55% of the machine's fp32 GEMM rate at 128 rows when D is small (SmolLM2, D = 576), ~86% at
    256 and ~97% at 512, so narrow models get more rows; D >= 896 runs well from 256."""
    dim = int(model.config.hidden_size)
    if next(model.parameters()).device.type != "cpu":
        return 256
    return 512 if dim <= 768 else 256 if dim <= 1536 else 128


def load_hf(name_or_path: str | None, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Load (model, tokenizer, identity). GGUF files go through the conversion cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = models.resolve(name_or_path)
    identity = models.model_identity(name_or_path, resolved)
    if isinstance(resolved, Path) and resolved.is_file():
        if resolved.suffix != ".gguf":
            raise QProbeError(f"model: {resolved} is a file but not a .gguf file")
        source = str(models.gguf_cache_dir(resolved))
    else:
        source = str(resolved)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise QProbeError(f"model: cannot load {name_or_path!r}: {e}".splitlines()[0]) from None
    model.to(device).eval()
    return model, tok, identity


def _spec(identity: str, chat: bool, layer: int, position: str, dim: int, dtype: str) -> FeatureSpec:
    return FeatureSpec(model=chat_identity(identity, chat), layer=layer, position=position,
                       dim=dim, dtype=dtype)


class HFLanguageModel(LanguageModel):
    """k samples per prompt from a local transformers model, with in-generation features."""

    def __init__(self, model, tokenizer, *, identity: str, layer: int | None = None,
                 position: str = "last", chat: bool | None = None, features: bool = True,
                 feature_dtype: str = "float16", max_batch_rows: int | None = None) -> None:
        self.model = model
        self.tok = PromptTokenizer(tokenizer, chat)
        self.name = identity
        self.n_layers = len(decoder_blocks(model))
        self.layer = resolve_layer(layer, self.n_layers)
        self.position = position
        self.features = features
        self.max_batch_rows = int(max_batch_rows or default_batch_rows(model))  # rows per forward
        self._spec = _spec(identity, self.tok.chat, self.layer, position,
                           int(model.config.hidden_size), feature_dtype)
        # Llama-family models run qprobe's own forward; anything else transformers' forward.
        self._dec = FastDecoder(model) if supports(model) else GenericDecoder(model)
        self.eos_ids = self.tok.eos_ids(model)  # set() makes every row run to max_new_tokens

    @property
    def chat(self) -> bool:
        return self.tok.chat

    @property
    def feature_spec(self) -> FeatureSpec | None:
        return self._spec if self.features else None

    def sample(self, prompts: list[str], k: int, params: SamplingParams, *,
               hook: StepHook | None = None, batch_rows: int | None = None,
               observe: StepObserver | None = None) -> list[list[Sample]]:
        """k samples per prompt, max_batch_rows rows at a time; each carries its feature (when
        features are on) and its log-probability sum under the model (temperature 1, no top-p).

        hook: called at every decode step with the feature-layer hidden state and the logits of
        the live rows, may change the logits before sampling (see `loop.StepHook`).
        batch_rows: rows per batch instead of max_batch_rows (a hook that runs a model of its
        own on several candidates per row needs fewer).
        observe: called at every step with the tokens just decided (see `loop.StepObserver`)."""
        if k < 1:
            raise QProbeError(f"k must be >= 1, got {k}")
        per_batch = max(1, int(batch_rows or self.max_batch_rows) // k)
        out: list[list[Sample]] = []
        for i in range(0, len(prompts), per_batch):
            chunk = prompts[i : i + per_batch]
            rows = run_batch(
                self._dec, [self.tok.prompt_ids(p) for p in chunk], chunk, k,
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_new_tokens=params.max_new_tokens, stop=list(params.stop), seed=params.seed,
                layer=self.layer, position=self.position, features=self.features,
                eos_ids=self._eos(params), detok=self.tok.decode, hook=hook, prompt_offset=i,
                observe=observe,
            )
            out.extend([Sample(r.text, r.token_ids, r.finish_reason, r.feature, r.logprob_sum,
                               num_tokens=len(r.token_ids)) for r in g] for g in rows)
        return out

    def _eos(self, params: SamplingParams) -> set[int]:
        """The tokens that end a row: none with `ignore_eos`."""
        return set() if params.ignore_eos else self.eos_ids

    @property
    def continuous(self) -> bool:
        """Whether `decode_continuous` can run (qprobe's own Llama-family forward)."""
        return isinstance(self._dec, FastDecoder)

    def decode_continuous(self, k: int, params: SamplingParams,
                          admit: Callable[[], list[tuple[str, int, Any]]],
                          deliver: Callable[[Any, list[Sample]], None],
                          observe: StepObserver | None = None,
                          drop: Callable[[Any], bool] | None = None) -> dict[str, int]:
        """Continuous batching (`continuous.run_continuous`): before each decode step,
        admit() -> [(prompt, seed, tag)] prompts that join the running decode (each seeded by
        its own seed; params.seed is not used); deliver(tag, k samples) as soon as a prompt's k
        rows have ended; drop(tag) -> True takes a running prompt out, never delivered (see
        `run_continuous`). Returns when nothing runs and nothing is admitted."""
        from qprobe.backends.hf.continuous import Joiner, run_continuous

        if not self.continuous:
            raise QProbeError("continuous batching needs a Llama-family model (FastDecoder)")

        def joiners() -> list[Joiner]:
            return [Joiner(self.tok.prompt_ids(p), p, int(seed), tag) for p, seed, tag in admit()]

        def give(tag: Any, rows: list[Any]) -> None:
            deliver(tag, [Sample(r.text, r.token_ids, r.finish_reason, r.feature, r.logprob_sum,
                                 num_tokens=len(r.token_ids)) for r in rows])

        return run_continuous(
            self._dec, k, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, max_new_tokens=params.max_new_tokens, stop=list(params.stop),
            layer=self.layer, position=self.position, features=self.features,
            eos_ids=self._eos(params), detok=self.tok.decode, admit=joiners, deliver=give,
            observe=observe, drop=drop)

    def embedder(self) -> HFEmbedder:
        """An embedder computing the same features from text, sharing this model's weights."""
        return HFEmbedder(self.model, self.tok.tokenizer, identity=self.name, layer=self.layer,
                          position=self.position, chat=self.tok.chat, feature_dtype=self._spec.dtype)


class HFEmbedder(Embedder):
    """Features of (prompt, completion) pairs in batched forward passes that stop at `layer`."""

    def __init__(self, model, tokenizer, *, identity: str, layer: int | None = None,
                 position: str = "last", chat: bool | None = None, feature_dtype: str = "float16",
                 max_batch_tokens: int = 8192) -> None:
        self.model = model
        self.tok = PromptTokenizer(tokenizer, chat)
        self.blocks = decoder_blocks(model)
        self.n_layers = len(self.blocks)
        self.layer = resolve_layer(layer, self.n_layers)
        self.position = position
        self.max_batch_tokens = int(max_batch_tokens)
        self._spec = _spec(identity, self.tok.chat, self.layer, position,
                           int(model.config.hidden_size), feature_dtype)

    @property
    def feature_spec(self) -> FeatureSpec:
        return self._spec

    def embed(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise QProbeError(f"embed: {len(prompts)} prompts but {len(completions)} completions")
        cache: dict[str, list[int]] = {}
        for p in prompts:
            if p not in cache:
                cache[p] = self.tok.prompt_ids(p)
        p_ids = [cache[p] for p in prompts]
        return self.embed_tokens(p_ids, [self.tok.completion_ids(c) for c in completions])

    @torch.no_grad()
    def embed_tokens(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> np.ndarray:
        """Features for already tokenised pairs: float32 [N, dim]. Pairs that share a prompt
        (k samples of one prompt) run the prompt once and their completions after its cache
        (`GroupEncoder`); the others one whole sequence each."""
        out = np.zeros((len(prompt_ids), self._spec.dim), dtype=np.float32)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompt_ids):
            by_prompt.setdefault(tuple(p), []).append(i)
        # GroupEncoder needs the decoder under `.model` (Llama, Qwen2, ...; not GPT-2)
        group = getattr(self.model, "model", None) is not None
        alone = [i for rows in by_prompt.values() if len(rows) == 1 or not group for i in rows]
        shared = [rows for rows in by_prompt.values() if len(rows) > 1 and group]
        if shared:
            from qprobe.backends.hf.encode import GroupEncoder

            enc = GroupEncoder(self.model, [self.layer], self.blocks)
            for rows in shared:
                _, _, feats = enc.encode(list(prompt_ids[rows[0]]),
                                         [list(completion_ids[r]) for r in rows])
                out[rows] = feats[self.layer][self.position]
        if alone:
            out[alone] = self._embed_whole([prompt_ids[i] for i in alone],
                                           [completion_ids[i] for i in alone])
        return out

    @torch.no_grad()
    def _embed_whole(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
                     ) -> np.ndarray:
        """Features of each (prompt, completion) as one sequence, batched: float32 [N, dim]."""
        n = len(prompt_ids)
        out = np.zeros((n, self._spec.dim), dtype=np.float32)
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        order = sorted(range(n), key=lambda i: len(seqs[i]))
        dev = next(self.model.parameters()).device
        captured: list[torch.Tensor] = []

        def hook(_mod, _inp, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise StopForward

        handle = self.blocks[self.layer].register_forward_hook(hook)
        try:
            i = 0
            while i < n:
                longest = len(seqs[order[i]])
                j = i + 1
                while j < n and len(seqs[order[j]]) * (j - i + 1) <= max(self.max_batch_tokens, longest):
                    longest = len(seqs[order[j]])
                    j += 1
                idx = order[i:j]
                t = max(len(seqs[r]) for r in idx)
                ids = torch.zeros(len(idx), t, dtype=torch.long)
                mask = torch.zeros(len(idx), t, dtype=torch.long)
                for a, r in enumerate(idx):  # right padding: real tokens at positions 0..len-1
                    ids[a, : len(seqs[r])] = torch.tensor(seqs[r])
                    mask[a, : len(seqs[r])] = 1
                captured.clear()
                try:
                    # The hook stops the forward after block `layer` (no logits computed).
                    self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
                except StopForward:
                    pass
                h = captured[0].float().cpu()  # [b, t, D]
                for a, r in enumerate(idx):
                    lp, lt = len(prompt_ids[r]), len(seqs[r])
                    if self.position == "mean" and lt > lp:
                        out[r] = h[a, lp:lt].mean(0).numpy()
                    else:
                        out[r] = h[a, lt - 1].numpy()
                i = j
        finally:
            handle.remove()
        return out
