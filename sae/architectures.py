"""SAE architectures: TopK, BatchTopK, JumpReLU and ReLU, one small class each, registered by name.

Weights use SAE-Lens's layout (W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, threshold)
so export is a rename-free copy. Every class offers the same inference API (`encode`, `decode`,
`forward`) and one training entry point, `training_step`, which returns a `TrainOutput`.

Scaling convention: the trainer feeds `x * cfg.input_scale` (and targets `* cfg.target_scale`) so
that activations have norm about sqrt(d_in). Until `fold_scaling()` runs, the SAE acts on those
scaled tensors; afterwards on raw activations. Export always folds first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae import sparse
from sae.errors import SaekitError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SPARSITY_COEF = {"topk": 0.0, "batchtopk": 0.0, "jumprelu": 1.0, "relu": 5.0}


@dataclass
class SAEConfig:
    """What defines one SAE. Built by the run-config layer; stored in exported metadata."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32  # topk: latents per token; batchtopk: per token on average over a batch
    aux_k_coef: float = 1 / 32  # AuxK loss weight (topk, batchtopk); 0 disables it
    sparsity_coef: float | None = None  # final L1 (relu) / L0 (jumprelu) weight the trainer warms up to
    jumprelu_bandwidth: float = 0.05  # rectangle-kernel width of the threshold's straight-through gradient
    jumprelu_init_threshold: float = 0.1
    is_transcoder: bool = False  # encode one hook, reconstruct another
    d_out: int | None = None  # reconstruction width; None means d_in
    input_scale: float = 1.0  # the trainer feeds x * input_scale
    target_scale: float | None = None  # ... and targets * target_scale; None means input_scale
    dtype: str = "float32"
    seed: int = 0
    model_name: str = ""
    hook_name: str = ""
    hook_name_out: str | None = None  # transcoder target hook
    fast: bool = True  # sparse TopK/BatchTopK training kernels (False: plain dense autograd)
    encoder_bf16: bool | None = None  # bf16 encoder matmul in the fast path; None: time it once

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaekitError(f"SAE config: unknown architecture '{self.architecture}'; "
                              f"choose one of {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SaekitError(f"SAE config: {name} must be a positive integer, got {value!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.target_scale is None:
            self.target_scale = self.input_scale
        if self.sparsity_coef is None:
            self.sparsity_coef = DEFAULT_SPARSITY_COEF[self.architecture]
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise SaekitError(f"SAE config: k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        if not self.is_transcoder and self.d_out != self.d_in:
            raise SaekitError(f"SAE config: d_out={self.d_out} differs from d_in={self.d_in}; "
                              "set is_transcoder: true to reconstruct a different hook")
        if not self.is_transcoder and self.target_scale != self.input_scale:
            raise SaekitError("SAE config: target_scale must equal input_scale for a plain SAE (it reconstructs "
                              "its own input); leave target_scale unset")
        if self.input_scale <= 0 or self.target_scale <= 0:
            raise SaekitError("SAE config: input_scale and target_scale must be positive")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold < 0:
            raise SaekitError("SAE config: jumprelu_bandwidth must be > 0 and jumprelu_init_threshold >= 0")
        if self.aux_k_coef < 0 or self.sparsity_coef < 0:
            raise SaekitError("SAE config: aux_k_coef and sparsity_coef must be >= 0")
        if self.dtype not in DTYPES:
            raise SaekitError(f"SAE config: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


class TrainOutput(NamedTuple):
    """One training step. Only `loss` carries a graph; the rest is for logging and dead-latent stats."""

    loss: Tensor  # mse + aux_loss + sparsity_loss
    mse: Tensor  # squared error summed over dims, mean over tokens
    aux_loss: Tensor  # AuxK term, coefficient applied (0 for jumprelu/relu)
    sparsity_loss: Tensor  # L1/L0 term, coefficient applied (0 for topk/batchtopk)
    l0: Tensor  # mean number of firing latents per token
    fire_counts: Tensor  # [d_sae] int64: tokens on which each latent fired in this batch
    recon: Tensor  # [n, d_out] reconstruction


ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an architecture buildable by name (a new one is one class)."""

    def add(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return add


def build_sae(cfg: SAEConfig) -> SAE:
    return ARCHITECTURES[cfg.architecture](cfg)


class SAE(nn.Module):
    """Shared parameters and plumbing; subclasses define the activation and its training forward."""

    architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True  # relu keeps free decoder norms (its L1 is weighted by them)
    decoder_init_norm: ClassVar[float] = 1.0
    uses_auxk: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        W_dec *= self.decoder_init_norm / W_dec.norm(dim=1, keepdim=True)
        if cfg.is_transcoder:  # no shared space: an independent encoder with the same column norms
            W_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=gen)
            W_enc *= self.decoder_init_norm / W_enc.norm(dim=0, keepdim=True)
        else:  # tied init (OpenAI, sparsify)
            W_enc = W_dec.t().clone()
        self.W_enc = nn.Parameter(W_enc.to(dtype).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dtype))

    # -- inference ---------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        return self._center(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae]."""
        return self.activate(self.pre_acts(x.to(self.W_enc.dtype)))

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def _center(self, x: Tensor) -> Tensor:
        # A transcoder's b_dec lives in the target space, so it is not subtracted from the input.
        return x if self.cfg.is_transcoder else x - self.b_dec

    # -- training ----------------------------------------------------------------------------------

    def training_step(self, x: Tensor, target: Tensor | None = None, sparsity_coef: float = 0.0,
                      dead_mask: Tensor | None = None) -> TrainOutput:
        """Loss and statistics for one batch. `target` defaults to x (plain SAE); `dead_mask` [d_sae] bool
        marks latents the trainer considers dead (for AuxK); `sparsity_coef` is this step's L1/L0 weight."""
        x = x.to(self.W_enc.dtype)
        target = x if target is None else target.to(self.W_enc.dtype)
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in or target.shape != (x.shape[0], self.cfg.d_out):
            raise SaekitError(f"training_step: expected x [n, {self.cfg.d_in}] and target [n, {self.cfg.d_out}], "
                              f"got {list(x.shape)} and {list(target.shape)}; check the cache's hook and d")
        recon, sparsity_loss, fire_counts = self._train_forward(x, sparsity_coef)
        mse = (recon - target).pow(2).sum(-1).mean()
        aux = recon.new_zeros(())
        if self.uses_auxk and dead_mask is not None and self.cfg.aux_k_coef > 0:
            aux = self._auxk_loss(x, (target - recon).detach(), dead_mask)
        return TrainOutput(loss=mse + aux + sparsity_loss, mse=mse.detach(), aux_loss=aux.detach(),
                           sparsity_loss=sparsity_loss.detach(), l0=fire_counts.sum() / x.shape[0],
                           fire_counts=fire_counts, recon=recon.detach())

    def _train_forward(self, x: Tensor, sparsity_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        """(recon, sparsity loss with coefficient, per-latent fire counts)."""
        raise NotImplementedError

    def _auxk_loss(self, x: Tensor, residual: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top-k_aux dead latents reconstruct the live latents' residual.

        Pre-activations are computed for the dead columns only, so the cost scales with their number. It
        stays dense: k_aux (d_out / 2) is close to the number of dead latents once training is under way,
        and there dense matmuls beat the sparse kernels (5% dead, 4096 tokens, 1 thread: +90 vs +270 ms).
        """
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:
            return residual.new_zeros(())
        k_aux = max(self.cfg.d_out // 2, 1)
        scale = min(dead.numel() / k_aux, 1.0)
        vals, idx = (self._center(x) @ self.W_enc[:, dead] + self.b_enc[dead]).topk(min(k_aux, dead.numel()), dim=-1,
                                                                                    sorted=False)
        acts = x.new_zeros(x.shape[0], dead.numel()).scatter(-1, idx, vals.relu())
        return self.cfg.aux_k_coef * scale * (acts @ self.W_dec[dead] - residual).pow(2).sum(-1).mean()

    # -- helpers the trainer calls -----------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step); no-op where norms are free."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the W_dec gradient component along each row (before the step), so the step mostly rotates it."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            along = torch.einsum("ij,ij->i", self.W_dec.grad, unit).unsqueeze(1)  # no [d_sae, d] temporary
            self.W_dec.grad.addcmul_(along, unit, value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, geometric_median: bool = False, iters: int = 100) -> None:
        """Start b_dec at the data's centre (pass targets for a transcoder): mean, or Weiszfeld median."""
        sample = sample.to(self.b_dec.dtype).to(self.b_dec.device)
        if sample.ndim != 2 or sample.shape[1] != self.cfg.d_out or sample.shape[0] == 0:
            raise SaekitError(f"init_b_dec: expected a sample of shape [n, {self.cfg.d_out}], got {list(sample.shape)}")
        centre = sample.mean(0)
        if geometric_median:
            for _ in range(iters):
                weights = 1 / (sample - centre).norm(dim=1).clamp_min(1e-8)
                new = (weights[:, None] * sample).sum(0) / weights.sum()
                done = (new - centre).norm() <= 1e-6 * centre.norm().clamp_min(1e-8)
                centre = new
                if done:
                    break
        self.b_dec.copy_(centre)

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Rewrite the weights to act on raw activations, then set the scales to 1.

        Trained on x' = s_in x and t' = s_t t, pre' = (x' - b_dec) W_enc + b_enc. Dividing every
        latent by s_t keeps the decoder unit-norm and gives t = t' / s_t exactly:
        pre = pre' / s_t = (x - b_dec/s_in) (W_enc s_in/s_t) + b_enc/s_t, thresholds / s_t, and
        the output bias b_dec / s_t. A plain SAE has s_in = s_t, so W_enc is unchanged and the
        centring b_dec/s_in is the same tensor as the output bias b_dec/s_t.
        """
        s_in, s_t = self.cfg.input_scale, self.cfg.target_scale
        assert s_t is not None  # resolved in SAEConfig.__post_init__
        self.W_enc *= s_in / s_t
        self.b_enc /= s_t
        self.b_dec /= s_t
        self._scale_thresholds(1 / s_t)
        self.cfg.input_scale = self.cfg.target_scale = 1.0

    def _scale_thresholds(self, factor: float) -> None:
        """Architectures with thresholds rescale them with the pre-activations."""

    def _use_bf16(self) -> bool:
        if self.cfg.encoder_bf16 is not None:
            return self.cfg.encoder_bf16
        return sparse.bf16_is_faster(str(self.W_enc.device), self.cfg.d_in, self.cfg.d_sae)  # cached per shape

    def extra_repr(self) -> str:
        return f"{self.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, d_out={self.cfg.d_out}"


@register("topk")
class TopKSAE(SAE):
    """Keep each token's k largest pre-activations, relu after the selection (Gao et al. 2024)."""

    uses_auxk = True

    def activate(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def _train_acts_dense(self, pre: Tensor) -> Tensor:
        return self.activate(pre)

    def _train_forward(self, x: Tensor, sparsity_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        if self.cfg.fast:
            acts = sparse.sparse_encode(x, self.W_enc, self.b_enc, None if self.cfg.is_transcoder else self.b_dec,
                                        self.cfg.k, batch_topk=self.architecture == "batchtopk",
                                        bf16=self._use_bf16())
            recon = sparse.sparse_decode(acts, self.W_dec) + self.b_dec
            fired = acts.values > 0
            fire_counts = torch.bincount(acts.cols[fired], minlength=self.cfg.d_sae)
            self._after_selection(acts.values[fired])
        else:
            dense = self._train_acts_dense(self.pre_acts(x))
            recon = self.decode(dense)
            fire_counts = (dense > 0).sum(0)
            self._after_selection(dense[dense > 0])
        return recon, recon.new_zeros(()), fire_counts

    def _after_selection(self, fired_values: Tensor) -> None:
        """Hook for BatchTopK's threshold estimate."""


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """k per token on average: the batch's k*n largest pre-activations (Bussmann et al. 2024).

    Inference cannot see a batch, so it applies a global threshold: an exponential moving average
    of the smallest activation kept in each training batch. Exported as JumpReLU with that threshold.
    """

    threshold_ema: ClassVar[float] = 0.01

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=DTYPES[cfg.dtype]))

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _train_acts_dense(self, pre: Tensor) -> Tensor:
        flat = pre.flatten()
        vals, idx = flat.topk(self.cfg.k * pre.shape[0], sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals.relu()).view_as(pre)

    @torch.no_grad()
    def _after_selection(self, fired_values: Tensor) -> None:
        if fired_values.numel() == 0:
            return
        smallest = fired_values.min().to(self.threshold.dtype)
        current = self.threshold[0]
        new = smallest if current == 0 else (1 - self.threshold_ema) * current + self.threshold_ema * smallest
        self.threshold.fill_(new)

    def _scale_thresholds(self, factor: float) -> None:
        self.threshold *= factor


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


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Per-latent threshold below which a latent is off; trained with an L0 penalty (Rajamanoharan et al. 2024).

    The threshold is a parameter itself, kept >= 0 by projection, rather than a log-threshold: Adam moves a
    parameter by about lr per step, so a log parameter barely moves a small initial threshold in a short run
    (SAE-Lens issue #494), and zero thresholds from other tools stay representable.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=DTYPES[cfg.dtype]))

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _train_forward(self, x: Tensor, sparsity_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)
        pre = self.pre_acts(x)
        bw = self.cfg.jumprelu_bandwidth
        acts = _JumpReLU.apply(pre, self.threshold, bw)
        l0 = _Step.apply(pre, self.threshold, bw).sum(-1).mean()
        return self.decode(acts), sparsity_coef * l0, (acts > 0).sum(0)

    def _scale_thresholds(self, factor: float) -> None:
        self.threshold *= factor


@register("relu")
class ReLUSAE(SAE):
    """ReLU with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

    The weighting makes the penalty invariant to trading encoder for decoder scale, so the decoder
    norms are left free: `normalize_decoder_` and `remove_parallel_grad_` do nothing here.
    """

    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def _train_forward(self, x: Tensor, sparsity_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        acts = self.activate(self.pre_acts(x))
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        return self.decode(acts), sparsity_coef * l1, (acts > 0).sum(0)

