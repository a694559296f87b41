"""What `qprobe embed` does (qprobe.embed): a light module, so that the command's parser reads
the flags' help without importing numpy, pyarrow or torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbedConfig:
    """What `qprobe embed` does (every field is a command line flag)."""

    rollouts: str = field(metadata={"help": "Rollouts folder whose samples are re-encoded."})
    model: str | None = field(
        default=None, metadata={"help": "Model (default: the one named in the folder's meta.json)."}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Blocks to read features at (default: a bit past half depth, the collection layer "
                  "and the last block)."},
    )
    positions: list[str] = field(
        default_factory=lambda: ["last", "mean"],
        metadata={"help": "Feature positions: last (last completion token) and/or mean."},
    )
    skip_stored: bool = field(
        default=True,
        metadata={"help": "Do not store the set equal to the folder's own features (it is only "
                  "recomputed to check them)."},
    )
    limit_shards: int | None = field(default=None, metadata={"help": "Only the first N shards."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
