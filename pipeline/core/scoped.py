"""Settings that hold for one call only: environment variables a library reads, torch's seed and threads.

fgdata runs inside other people's processes (a notebook, a trainer, a Ray worker that runs other
tasks too), so it leaves the process as it found it: nothing is set at import, and what a call
needs is put back when the call returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """`values` in os.environ inside the block; each variable is restored (or removed) after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """torch's global RNG (CPU and every CUDA device) seeded with `seed` inside the block, and the
    caller's RNG state put back after, so a seeded generate is reproducible without resetting the
    random stream of whoever called it (transformers' `generate` samples from the global RNG)."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block, the caller's put back after.

    Ray starts a task or actor with OMP_NUM_THREADS = its CPUs, so torch there runs on that many
    threads; a float sum split over another number of threads rounds differently, enough to move a
    detection across its score threshold. The in-process executor uses this to compute as Ray does."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
