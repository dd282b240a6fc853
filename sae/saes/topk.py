"""TopK: keep each token's k largest pre-activations, relu after the selection (Gao et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.errors import SaekitError
from sae.saes import kernels
from sae.saes.base import SAE, ArchConfig, Provenance, SAEShape, register


@dataclass
class TopKConfig(ArchConfig):
    k: int = 32  # latents per token
    aux_k_coef: float = 1 / 32  # AuxK loss weight; 0 disables it
    fast: bool | None = True  # sparse training kernels (False: plain dense autograd; None: time both on the device)
    encoder_bf16: bool | None = None  # bf16 encoder matmul in the fast path; None: time it once per shape

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or self.k <= 0:
            raise SaekitError(f"SAE config: k must be a positive integer, got {self.k!r}")
        if self.aux_k_coef < 0:
            raise SaekitError("SAE config: aux_k_coef must be >= 0")


@register("topk", TopKConfig)
class TopKSAE(SAE):
    """Exactly k latents per token; AuxK revives dead latents."""

    uses_auxk = True
    hyper: TopKConfig

    def __init__(self, shape: SAEShape, hyper: TopKConfig, provenance: Provenance, seed: int = 0):
        super().__init__(shape, hyper, provenance, seed)
        if not 1 <= hyper.k <= shape.d_sae:
            raise SaekitError(f"SAE config: k must be between 1 and d_sae={shape.d_sae}, got {hyper.k}")

    def activate(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.hyper.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def _train_acts_dense(self, pre: Tensor) -> Tensor:
        return self.activate(pre)

    def _train_forward(self, x: Tensor, sparsity_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        if self.hyper.fast:
            acts = kernels.sparse_encode(x, self.W_enc, self.b_enc, None if self.shape.is_transcoder else self.b_dec,
                                         self.hyper.k, batch_topk=self.architecture == "batchtopk",
                                         bf16=self._use_bf16())
            recon = kernels.sparse_decode(acts, self.W_dec) + self.b_dec
            fired = acts.values > 0
            fire_counts = torch.bincount(acts.cols[fired], minlength=self.shape.d_sae)
            self._after_selection(acts.values[fired])
        else:
            dense = self._train_acts_dense(self.pre_acts(x))
            recon = self.decode(dense)
            fire_counts = (dense > 0).sum(0)
            self._after_selection(dense[dense > 0])
        return recon, recon.new_zeros(()), fire_counts

    def _after_selection(self, fired_values: Tensor) -> None:
        """Hook for BatchTopK's threshold estimate."""
