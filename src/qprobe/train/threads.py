"""How many threads each part of training uses.

The setup passes (statistics, standardising) and a linear probe's step are bound by memory
traffic, which two cores stream faster than one; but on small problems, or on a machine shared
with other jobs, handing work between threads costs more than it gains. The numbers below were
measured with bench/train_speed.py on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from qprobe.train.config import TrainConfig

SHARDS = 2  # runs of whole units per batch, one per core on a 2-core machine (both engines)
PARALLEL_BATCH_BYTES = 4 << 20  # auto threads, torch step: batches this big run shards at once
NATIVE_PARALLEL_BYTES = 1 << 20  # the same for linfit.c (1000 rows of 896 dims in float16: yes)
SMALL_PROBLEM = 1 << 23  # training matrix elements (x MLP width) below which one thread is used


def cores() -> int:
    """CPU cores this process may run on."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return n or 1


def busy() -> bool:
    """Whether the machine already runs about a core's worth of other work per core (1-minute
    load average >= cores). Then a step split over two threads waits for a descheduled partner
    at every hand-off, many times slower than one thread (measured in docs/objectives.md). The
    result is the same bits either way, so the choice only moves time."""
    try:
        return os.getloadavg()[0] >= cores()
    except OSError:  # no load average on this platform
        return False


def setup_threads() -> int:
    """Threads for the setup passes: they are bound by memory traffic, which two cores
    stream faster than one."""
    return min(2, cores())


def step_threads(cfg: TrainConfig, x: torch.Tensor, native: bool) -> int:
    """Threads for the linear step (`native`: in linfit.c): cfg.threads, or (0: auto) one per
    shard when a batch holds enough features to be worth sharing and the process may use that
    many cores: at least NATIVE_PARALLEL_BYTES in linfit.c, PARALLEL_BATCH_BYTES in the torch
    step, and the machine is not already busy. Smaller batches were as fast or faster on one
    thread (bench/train_speed.py, 2 cores): the hand-over between threads (and in torch the GIL
    held by small operations) cost what they gain."""
    if cfg.hidden:
        return 1
    if cfg.threads:
        return min(cfg.threads, SHARDS)
    batch_bytes = min(cfg.batch_size, len(x)) * x.shape[1] * x.element_size()
    enough = NATIVE_PARALLEL_BYTES if native else PARALLEL_BATCH_BYTES
    return SHARDS if batch_bytes >= enough and cores() >= SHARDS and not busy() else 1


def torch_threads_for(cfg: TrainConfig, x: torch.Tensor) -> int:
    """torch's own threads while the steps run: one for a linear probe (its step shards run on
    their own threads) and for a small MLP, all of them for a big MLP."""
    small = not cfg.hidden or x.numel() * sum(cfg.hidden) < SMALL_PROBLEM
    return 1 if small else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n torch threads. Small problems train faster on one: per-op thread
    synchronisation costs more than the arithmetic, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
