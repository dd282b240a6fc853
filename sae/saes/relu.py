"""ReLU with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sae.errors import SaekitError
from sae.saes.base import SAE, ArchConfig, register


@dataclass
class ReLUConfig(ArchConfig):
    sparsity_coef: float = 5.0  # final L1 weight the trainer warms up to

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity_coef < 0:
            raise SaekitError("SAE config: sparsity_coef must be >= 0")


@register("relu", ReLUConfig)
class ReLUSAE(SAE):
    """The weighting makes the penalty invariant to trading encoder for decoder scale, so the decoder
    norms are left free: `normalize_decoder_` and `remove_parallel_grad_` do nothing here."""

    unit_norm_decoder = False
    decoder_init_norm = 0.1
    hyper: ReLUConfig

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def _train_forward(self, x: Tensor, sparsity_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        acts = self.activate(self.pre_acts(x))
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self.decode(acts), sparsity_scale * self.hyper.sparsity_coef * l1, (acts > 0).sum(0)
