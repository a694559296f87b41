"""A tiny randomly initialised Llama-family model with a character-level tokenizer, built in code.

Helper for the backend/collect/embedder tests (nothing is downloaded). Characters map to single
tokens, so re-tokenising a completion gives back exactly the sampled token ids.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.ascii_letters + string.digits + " \n.,:;()[]=+-*/_'\"#<>!?"
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def build_model(kind: str = "llama", seed: int = 0, vocab: int | None = None, layers: int = 3,
                hidden: int = 64, heads: int = 4):
    """A tiny random model: hidden 64, 4 query heads / 2 kv heads (GQA), `layers` blocks (vLLM's
    CPU attention wants head_dim 64 or more: hidden=128, heads=2)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    n_vocab = vocab or len(SPECIALS) + len(CHARS)
    common = dict(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "gpt2":  # not Llama-family: runs through GenericDecoder
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=n_vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False))
        with torch.no_grad():
            model.transformer.wte.weight.mul_(10.0)
            model.lm_head.weight.mul_(10.0)
        return model.eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    # Random init gives near-uniform next-token distributions; sharpen them (x10) so that
    # sampling, greedy decoding and EOS behave more like a trained model.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def save_tiny(folder: Path, kind: str = "llama", seed: int = 0, **shape) -> Path:
    """Write a tiny model + tokenizer as a transformers folder (loadable by qprobe); `shape`:
    build_model's layers / hidden / heads."""
    folder.mkdir(parents=True, exist_ok=True)
    build_model(kind, seed, **shape).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder
