"""What a collection does: `CollectConfig` (every field a `qprobe collect` flag) and the Ray
executor's knobs, `RayConfig`, defined once (an experiment's `executor:` extends it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from qprobe import defaults


@dataclass
class RayConfig:
    """Where the batches run with `--executor ray` (docs/scale-out.md); none of these is part of
    a rollouts folder's identity."""

    address: str | None = field(default=None, metadata={
        "help": "Ray cluster address, e.g. 10.0.0.1:6379 or auto (default: $RAY_ADDRESS, else "
                "start Ray on this machine)."})
    workers: int | None = field(default=None, metadata={
        "help": "Ray actors, each loading the model once (default: as many as the cluster's "
                "CPUs, or GPUs with --gpus-per-worker, fit)."})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per actor (0: CPU)."})
    threads_per_worker: int = field(default=1, metadata={
        "help": "CPUs reserved per actor and torch threads in it."})
    retries: int = field(default=2, metadata={
        "help": "Times a batch whose actor died is re-queued before it is reported as failed."})
    storage: str = field(default="auto", metadata={
        "help": "auto (actors that see the rollouts folder commit shards themselves, others "
                "return rows to the driver), shared (require it) or driver (always return rows)."})

    def ray_knobs(self) -> RayConfig:
        """These knobs alone (from a config that extends this one, e.g. an experiment's)."""
        return RayConfig(**{f.name: getattr(self, f.name) for f in fields(RayConfig)})


@dataclass
class CollectConfig:
    """What `qprobe collect` does (every field is a command line flag; `ray`: its Ray flags)."""

    out: str = field(metadata={"help": "Rollouts folder to create or resume."})
    task: str = field(default="mbpp", metadata={"help": "Task name, or a .jsonl of {id, prompt} rows."})
    split: str | None = field(default=None, metadata={"help": "Task split (default: the only one)."})
    model: str | None = field(default=None, metadata={"help": "Model (default: embedded SmolLM2)."})
    backend: str | None = field(
        default=None, metadata={"help": "Backend: hf, openai or adapter (--model an adapter "
                                "folder, as --adapter) (default: openai for an http(s):// "
                                "--model, else hf)."}
    )
    k: int | None = field(default=None, metadata={
        "help": "Samples per prompt (default 16; for preference pairs 0: the model's samples "
                "beside each pair, which the dpo objective needs)."})
    layer: int | None = field(default=None, metadata={"help": "Feature layer (negative: from top)."})
    position: str = field(default="last", metadata={"help": "Feature position: last or mean."})
    feature_dtype: str = field(default="float16", metadata={"help": "Stored feature dtype."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    max_new_tokens: int = field(default=defaults.MAX_NEW_TOKENS,
                                metadata={"help": "Tokens per completion at most."})
    temperature: float = field(default=defaults.TEMPERATURE,
                               metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=defaults.TOP_P, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed; each (prompt, sample) is seeded."})
    batch_prompts: int | None = field(
        default=None, metadata={"help": "Prompts per batch and shard (default: the model's rows at once // k, >= 1; 128-512 rows by model width)."}
    )
    chat: bool | None = field(
        default=None, metadata={"help": "Wrap prompts in the chat template (default: if the model has one)."}
    )
    data: str | None = field(default=None, metadata={"help": "Local data folder for the task."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})
    dtype: str | None = field(default=None, metadata={
        "help": "Weights dtype of a local model: float32, bfloat16 or float16 (default: float32 "
                "on CPU, bfloat16 on CUDA; float32 on CUDA reproduces CPU rows)."})
    embedder: str | None = field(
        default=None,
        metadata={"help": "For an API --model: local model computing the features, or "
                  "'server' for the server's /v1/embeddings (default: no features)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
    adapter: str | None = field(default=None, metadata={
        "help": "Sample from the policy of this adapter folder (`qprobe adapt`), on the base "
                "model it was trained on (--model is not used)."})
    pairs: bool = field(default=True, metadata={
        "help": "For a preference task: embed both answers of each pair and write pairs.parquet "
                "(--no-pairs: sample its prompts like any task's)."})
    executor: str = field(default="local", metadata={
        "help": "local (this process) or ray (actors on a Ray cluster; pip install 'qprobe[ray]')."})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "With --executor ray: where the batches run (not part of the folder's identity)."})
