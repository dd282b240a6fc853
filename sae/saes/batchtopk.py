"""BatchTopK: k per token on average, the batch's k*n largest pre-activations (Bussmann et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.errors import SaekitError
from sae.saes import kernels
from sae.saes.base import DTYPES, Provenance, SAEShape, register
from sae.saes.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_ema: float = 0.01  # moving-average weight of each batch's smallest kept activation

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_ema <= 1:
            raise SaekitError("SAE config: threshold_ema must be in (0, 1]")


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(TopKSAE):
    """Inference cannot see a batch, so it applies a global threshold: an exponential moving average of the
    smallest activation kept in each training batch. Exported as JumpReLU with that threshold."""

    hyper: BatchTopKConfig

    def __init__(self, shape: SAEShape, hyper: BatchTopKConfig, provenance: Provenance, seed: int = 0):
        super().__init__(shape, hyper, provenance, seed)
        self.register_buffer("threshold", torch.zeros(shape.d_sae, dtype=DTYPES[hyper.dtype]))

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _train_acts_dense(self, pre: Tensor) -> Tensor:
        """The same selection as the sparse kernels (global under `kernels.global_batch`), as a dense tensor."""
        crow, cols = kernels.batchtopk_pattern(pre.detach(), self.hyper.k)
        rows = torch.repeat_interleave(torch.arange(pre.shape[0], device=pre.device), crow.diff())
        return torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols].relu())

    @torch.no_grad()
    def _after_selection(self, fired_values: Tensor) -> None:
        """EMA of the smallest kept activation of the (global) batch; every process must call it."""
        smallest = kernels.global_min(fired_values)
        if smallest is None:
            return
        smallest = smallest.to(self.threshold.dtype)
        current = self.threshold[0]
        ema = self.hyper.threshold_ema
        new = smallest if current == 0 else (1 - ema) * current + ema * smallest
        self.threshold.fill_(new)

    def _scale_thresholds(self, factor: float) -> None:
        self.threshold *= factor
