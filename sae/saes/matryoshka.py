"""Matryoshka BatchTopK: nested dictionary prefixes, each trained to reconstruct on its own
(Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima 2024).

Latents are selected exactly as in BatchTopK (the batch's k*n largest pre-activations). The loss adds,
for every prefix width w_1 < ... < w_M = d_sae, the reconstruction error with every latent beyond the
prefix zeroed:

    loss = sum_m  mean_tokens || t - (b_dec + sum_{j < w_m} a_j W_dec[j]) ||^2  +  AuxK

The sum follows SAE-Lens's MatryoshkaBatchTopKTrainingSAE (full-width MSE plus each inner level's MSE).
dictionary_learning's MatryoshkaBatchTopKTrainer averages instead (group weights 1/M, then a mean over
the M weighted terms): the same gradient up to a constant factor, which with Adam only changes how much
AuxK weighs against the reconstruction. Early latents must reconstruct alone, so they learn general
directions and later ones refine them, rather than absorbing each other. Inference and export are
BatchTopK's: the global threshold, written as a JumpReLU SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.errors import SaekitError
from sae.saes import kernels
from sae.saes.base import Provenance, SAEShape, TrainOutput, register
from sae.saes.batchtopk import BatchTopKConfig, BatchTopKSAE

DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # nested sizes doubling up to the whole dictionary


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    # Nested prefix sizes, increasing: each a fraction of d_sae (<= 1) or a number of latents (an integer > 1);
    # d_sae itself is added when missing. None: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae.
    prefixes: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefixes is None:
            return
        if not self.prefixes:
            raise SaekitError("SAE config: prefixes must list at least one size, e.g. [0.125, 0.25, 0.5]; "
                              "omit it for the default")
        for p in self.prefixes:
            if isinstance(p, bool) or not isinstance(p, int | float) or p <= 0 or (p > 1 and p != int(p)):
                raise SaekitError(f"SAE config: prefixes entry {p!r} must be a fraction of d_sae in (0, 1] or a "
                                  "whole number of latents > 1")


def prefix_widths(d_sae: int, prefixes: list[float] | None) -> list[int]:
    """The prefix widths (latent counts), strictly increasing and ending at d_sae."""
    if prefixes is None:  # the default drops the sizes a small dictionary cannot hold
        return sorted({w for w in (int(f * d_sae) for f in DEFAULT_FRACTIONS) if w >= 1})
    widths = [round(p * d_sae) if p <= 1 else int(p) for p in prefixes]
    if widths[-1] != d_sae:
        widths.append(d_sae)
    bad = [w for w in widths if not 1 <= w <= d_sae]
    if bad or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise SaekitError(f"SAE config: prefixes {prefixes} give widths {widths} for d_sae={d_sae}; they must "
                          f"increase strictly and lie between 1 and d_sae")
    return widths


@register("matryoshka", MatryoshkaConfig)
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK trained with the summed reconstruction losses of its nested prefixes.

    The fast path reuses the sparse BatchTopK kernels: a prefix's reconstruction is the same embedding-bag
    decode with the values of latents beyond the prefix masked to zero (one extra decode per prefix, each
    over the k*n chosen latents only)."""

    hyper: MatryoshkaConfig

    def __init__(self, shape: SAEShape, hyper: MatryoshkaConfig, provenance: Provenance, seed: int = 0):
        super().__init__(shape, hyper, provenance, seed)
        self.widths = prefix_widths(shape.d_sae, hyper.prefixes)
        self._inner: list[Tensor] = []  # inner prefixes' reconstructions of the current step

    def training_step(self, x: Tensor, target: Tensor | None = None, sparsity_scale: float = 1.0,
                      dead_mask: Tensor | None = None) -> TrainOutput:
        """BatchTopK's step (full-width MSE, AuxK on the full residual), plus every inner prefix's MSE in `loss`;
        `mse` stays the full dictionary's, so logged FVUs compare across architectures."""
        out = super().training_step(x, target, sparsity_scale, dead_mask)
        inner, self._inner = self._inner, []
        goal = (x if target is None else target).to(self.W_enc.dtype)
        nested = sum(((r - goal).pow(2).sum(-1).mean() for r in inner), out.loss.new_zeros(()))
        return out._replace(loss=out.loss + nested)

    def _train_forward(self, x: Tensor, sparsity_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        if self.hyper.fast:
            acts = kernels.sparse_encode(x, self.W_enc, self.b_enc, None if self.shape.is_transcoder else self.b_dec,
                                         self.hyper.k, batch_topk=True, bf16=self._use_bf16())
            fired = acts.values > 0
            fire_counts = torch.bincount(acts.cols[fired], minlength=self.shape.d_sae)
            self._after_selection(acts.values[fired])
            recons = [kernels.sparse_decode(acts._replace(values=acts.values * (acts.cols < w)), self.W_dec)
                      + self.b_dec for w in self.widths[:-1]]
            recons.append(kernels.sparse_decode(acts, self.W_dec) + self.b_dec)
        else:
            dense = self._train_acts_dense(self.pre_acts(x))
            fire_counts = (dense > 0).sum(0)
            self._after_selection(dense[dense > 0])
            recons = [dense[:, :w] @ self.W_dec[:w] + self.b_dec for w in self.widths]
        self._inner = recons[:-1]
        return recons[-1], recons[-1].new_zeros(()), fire_counts
