"""`ReviewConfig`: what `qprobe review` does, torch- and numpy-free so `qprobe --help` stays fast
(the work is in review.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

REVIEW_TASKS = ("humaneval", "mbpp")  # = sorted(review.REVIEW_FORMATS) (a test checks)


@dataclass
class ReviewConfig:
    """What `qprobe review` does (every field is a command line flag)."""

    rollouts: str = field(metadata={"help": "Rollouts folder whose candidates are reviewed."})
    model: str | None = field(
        default=None, metadata={"help": "Reviewer model: a local model (default: the folder's "
                                "own) or an OpenAI-compatible server URL (http://host:port)."})
    task: str | None = field(
        default=None, metadata={"help": f"Reviewer prompt format, one of {list(REVIEW_TASKS)} "
                                "(default: the folder's task)."})
    limit_shards: int | None = field(default=None, metadata={"help": "Only the first N shards."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if any)."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight (server only)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on stderr."})
