"""What `qprobe adapt` does: `AdaptConfig` (every field is a flag). Torch-free, so that
`qprobe --help` stays fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qprobe.adapters.methods import METHODS as _REGISTRY
from qprobe.errors import QProbeError

FORMAT = "qprobe-adapter/1"
METHODS = tuple(_REGISTRY)  # the method registry's keys (adapters/methods.py)


@dataclass
class AdaptConfig:
    """What `qprobe adapt` does (every field is a command line flag)."""

    out: str = field(metadata={"help": "Adapter folder to create or resume.", "required": True})
    method: str = field(default="qadapter", metadata={
        "choices": list(METHODS),
        "help": "; ".join(f"{m.key}: {m.help}" for m in _REGISTRY.values()) + "."})
    task: str = field(default="hh-harmless", metadata={
        "help": "Preference task or pair file ({prompt, chosen, rejected} JSONL)."})
    split: str = field(default="train", metadata={"help": "Task split."})
    data: str | None = field(default=None, metadata={"help": "Local data folder for the task."})
    model: str | None = field(default=None, metadata={"help": "Base model (default: SmolLM2)."})
    chat: bool | None = field(default=None, metadata={
        "help": "Wrap prompts in the chat template (default: if the model has one), as collect."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N pairs."})
    max_prompt_tokens: int = field(default=256, metadata={
        "help": "Keep the last N prompt tokens."})
    max_answer_tokens: int = field(default=128, metadata={
        "help": "Keep the first N tokens of each answer."})
    epochs: int = field(default=1, metadata={"help": "Passes over the pairs."})
    batch_pairs: int = field(default=4, metadata={"help": "Pairs per optimiser step."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (constant)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "Modules that get a LoRA."})
    a: float = field(default=1.0, metadata={"help": "qadapter: alpha-tilde, the policy's temperature."})
    a0: float = field(default=0.01, metadata={"help": "qadapter: alpha_0, weight of log pi_0."})
    gamma: float = field(default=1.0, metadata={"help": "qadapter: discount."})
    beta: float = field(default=0.1, metadata={
        "help": "qadapter: weight of mean r^2; dpo: DPO's beta."})
    save_every: int = field(default=25, metadata={"help": "Checkpoint every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the pair order, LoRA init, dropout."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise QProbeError(f"adapt: --method must be one of {METHODS}, got {self.method!r}")
        for name in ("epochs", "batch_pairs", "lora_r", "save_every"):
            if getattr(self, name) < 1:
                raise QProbeError(f"adapt: --{name.replace('_', '-')} must be >= 1")
        if self.a <= 0:
            raise QProbeError("adapt: --a must be > 0")

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the stored one (not `out`, `device`, `save_every`)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "device", "save_every")}
