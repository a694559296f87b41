"""Fine-tuned baselines for learning from preferences, beside the probe: LoRA adapters on the
frozen base model.

- `qadapter.py`: Q-Adapter (Li et al., arXiv 2407.03856): the adapter's logits are a residual
  Q-function; its loss, its policy and the decode-loop hook that samples from it.
- `dpo.py`: DPO on the same LoRA through TRL's `DPOTrainer` (the anchor users know).
- `data.py`: preference pairs as token ids, cut to a budget, in padded batches.
- `train.py`: the Q-Adapter training loop (resumable from checkpoints), saving and loading.

peft (and trl for DPO) are optional dependencies: `pip install 'qprobe[adapters]'`.
"""
