"""Batch sources the trainer draws from, other than the disk cache (`sae.cache.ActivationBatches`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sae.errors import SaekitError
from sae.trainer import Batches


def tensor_batches(tensors: list[Tensor], batch_size: int, seed: int = 0) -> Batches:
    """Shuffled global batches from in-memory activations (one [n, d] tensor per hook, rows aligned),
    reshuffled every epoch, resumable at any batch: for notebooks and tests."""
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise SaekitError("tensor_batches: every tensor needs the same number of rows (one row per token)")
    if n < batch_size:
        raise SaekitError(f"tensor_batches: {n} rows is fewer than one batch of {batch_size}; pass more "
                          "activations or a smaller train.batch_size")
    per_epoch = n // batch_size

    def batches(start: int = 0) -> Iterator[list[Tensor]]:
        step = start
        while True:
            epoch, i = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            rows = order[i * batch_size:(i + 1) * batch_size]
            yield [t[rows] for t in tensors]
            step += 1

    return batches
