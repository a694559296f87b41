"""Prompt formatting and fast detokenisation: the one wrapper every local-model user tokenises with.

`PromptTokenizer` turns a prompt into the ids the model reads (through the chat template or not)
and a completion into its own ids, so the sampler, the embedder, `qprobe embed`, the adapters and
the reward heads all see the same tokens. `pad_id` is the one padding fallback.
"""

from __future__ import annotations

from qprobe.errors import QProbeError


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS, else 0.

    Every qprobe batch masks its padding (an attention mask, or right padding after the real
    tokens under causal attention, with sums and features over real positions only), so the value
    never changes a result; it only has to be an id the model knows. EOS first follows the usual
    transformers convention (`pad_token = eos_token`)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


class PromptTokenizer:
    """Prompt formatting and fast detokenisation shared by the sampler and the embedder.

    chat: wrap a prompt as one user message in the tokenizer's chat template (None: when it has
    one; True without a template is refused)."""

    def __init__(self, tokenizer, chat: bool | None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise QProbeError("--chat: this model's tokenizer has no chat template")
        self.chat = has_template if chat is None else bool(chat)
        self.backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def completion_ids(self, completion: str) -> list[int]:
        return list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])

    def decode(self, batch: list[list[int]]) -> list[str]:
        if self.backend is not None:
            return self.backend.decode_batch(batch, skip_special_tokens=False)
        return [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in batch]

    def eos_ids(self, model) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(model, "generation_config", None), model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            ids.update([e] if isinstance(e, int) else (e or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids
