"""Where the labeler's time goes: wall time per phase, and single-threaded runs for many small problems.

The report prints the phases, so a slow run shows whether model forwards or the bookkeeping around them dominate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timer:
    """Wall time per named phase; `forward` collects every model forward pass."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def one_thread() -> Iterator[None]:
    """Small problems (the probes) run several times faster on one thread than on a shared pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
