"""JumpReLU: a per-latent threshold below which a latent is off, trained with an L0 penalty
(Rajamanoharan et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae.errors import SaekitError
from sae.saes.base import DTYPES, SAE, ArchConfig, Provenance, SAEShape, register


@dataclass
class JumpReLUConfig(ArchConfig):
    sparsity_coef: float = 1.0  # final L0 weight the trainer warms up to
    bandwidth: float = 0.05  # rectangle-kernel width of the threshold's straight-through gradient
    init_threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bandwidth <= 0 or self.init_threshold < 0 or self.sparsity_coef < 0:
            raise SaekitError("SAE config: bandwidth must be > 0, init_threshold and sparsity_coef >= 0")


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold's gradient uses a rectangle-kernel straight-through estimate."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        g_threshold = -(threshold / bw) * (_rectangle((pre - threshold) / bw) * grad).sum(0)
        return (pre > threshold) * grad, g_threshold, None


class _Step(torch.autograd.Function):
    """Heaviside(pre - threshold) for the L0 penalty; gradient to the threshold only (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        return None, -(1 / bw) * (_rectangle((pre - threshold) / bw) * grad).sum(0), None


@register("jumprelu", JumpReLUConfig)
class JumpReLUSAE(SAE):
    """The threshold is a parameter itself, kept >= 0 by projection, rather than a log-threshold: Adam moves a
    parameter by about lr per step, so a log parameter barely moves a small initial threshold in a short run
    (SAE-Lens issue #494), and zero thresholds from other tools stay representable.
    """

    hyper: JumpReLUConfig

    def __init__(self, shape: SAEShape, hyper: JumpReLUConfig, provenance: Provenance, seed: int = 0):
        super().__init__(shape, hyper, provenance, seed)
        self.threshold = nn.Parameter(torch.full((shape.d_sae,), hyper.init_threshold, dtype=DTYPES[hyper.dtype]))

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _train_forward(self, x: Tensor, sparsity_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        pre = self.pre_acts(x)
        bw = self.hyper.bandwidth
        acts = _JumpReLU.apply(pre, self.threshold, bw)
        l0 = _Step.apply(pre, self.threshold, bw).sum(-1).mean()
        return self.decode(acts), sparsity_scale * self.hyper.sparsity_coef * l0, (acts > 0).sum(0)

    def _scale_thresholds(self, factor: float) -> None:
        self.threshold *= factor
