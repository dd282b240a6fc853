"""From an activation cache to what the trainer takes: the hooks to read, samples to size and scale each SAE,
and the stream of shuffled global batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae.cache import ActivationBatches, CacheReader, hook_dir
from sae.config import SAESpec
from sae.trainer import Batches


def spec_hooks(specs: list[SAESpec]) -> list[str]:
    """Every hook the SAEs read or reconstruct, each once, in order: the tensors of each batch."""
    out: list[str] = []
    for s in specs:
        for h in (s.hook, s.target_hook):
            if h and h not in out:
                out.append(h)
    return out


def reader_sample(reader: CacheReader, n: int = 16384) -> Tensor:
    """An even sample of rows (finite ones), for activation scaling and the decoder bias's start."""
    rows = np.linspace(0, reader.n_rows - 1, min(n, reader.n_rows)).astype(np.int64)
    x = reader.activations(rows)
    return x[torch.isfinite(x).all(dim=1)]


def cache_source(cache_dir: Path, hooks: list[str], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> tuple[dict[str, CacheReader], Batches]:
    """Readers for each hook's cache and the batch stream (each rank reads its own rows of each batch)."""
    readers = {h: CacheReader(hook_dir(cache_dir, h)) for h in hooks}
    stream = ActivationBatches([readers[h] for h in hooks], batch_size, seed, rank, world)
    return readers, stream
