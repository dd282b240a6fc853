"""Sparse TopK / BatchTopK training kernels.

A TopK SAE only ever uses k of its d_sae latents per token, so after the encoder matmul nothing needs
a dense tokens x latents tensor. The forward pass keeps the chosen latents as CSR rows (token ->
latent ids and values); the backward pass computes gradients only through them:

- encoder matmul in bf16 where that is faster (fp32 master weights); the chosen values are then
  recomputed exactly in fp32 with a sampled matmul, so bf16 only decides *which* latents fire;
- relu over the k chosen values only; decode is an embedding-bag over the chosen decoder rows;
- weight gradients are sparse x dense products (the latents x tokens transpose of the CSR pattern
  times x or the output gradient), not `index_add_` or dense matmuls over all latents;
- nothing of shape [tokens, latents] is saved for backward.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseActs(NamedTuple):
    """Latent activations of n tokens as CSR rows, values >= 0 (zeros where a chosen pre-activation was <= 0)."""

    values: Tensor  # [nnz] float, differentiable
    cols: Tensor  # [nnz] int64 latent ids, row-major, sorted within each row
    crow: Tensor  # [n + 1] int64 row offsets
    t_crow: Tensor  # [d_sae + 1] offsets of the latents x tokens transpose (shared by both backward passes)
    t_rows: Tensor  # [nnz] token ids in latent-major order
    order: Tensor  # [nnz] position of each transposed entry in the row-major arrays


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # the "CSR support is in beta" notice; the few ops used here are solid
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def _rows(crow: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def _transpose_pattern(crow: Tensor, cols: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """(t_crow, t_rows, order) of the latents x tokens CSR: one stable sort, done once per step,
    because CSR @ dense beats CSC @ dense for both weight gradients."""
    order = torch.argsort(cols, stable=True)
    t_crow = torch.zeros(d_sae + 1, dtype=torch.long, device=cols.device)
    t_crow[1:] = torch.bincount(cols, minlength=d_sae).cumsum(0)
    return t_crow, _rows(crow)[order], order


def _transpose(t_crow: Tensor, t_rows: Tensor, order: Tensor, values: Tensor, n: int) -> Tensor:
    return _csr(t_crow, t_rows, values[order], (t_crow.numel() - 1, n))


def topk_pattern(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-token top-k latents as (crow, cols)."""
    n = pre.shape[0]
    cols = pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    crow = torch.arange(0, n * k + 1, k, device=pre.device)
    return crow, cols.flatten()


class BatchGroup(Protocol):
    """Collectives over the processes that each hold an equal slice of one global batch, in rank order
    (`sae.distributed.GlobalBatch` implements them for torchrun)."""

    rank: int
    world: int

    def all_min(self, t: Tensor) -> Tensor: ...  # in place over every process; returns t
    def all_sum(self, t: Tensor) -> Tensor: ...
    def gather(self, t: Tensor) -> list[Tensor]: ...  # every process's 1-D tensor (sizes may differ), rank order


_GROUP: ContextVar[BatchGroup | None] = ContextVar("saekit_batch_group", default=None)


@contextmanager
def global_batch(group: BatchGroup | None) -> Iterator[None]:
    """While open, BatchTopK selections and threshold updates are made against the global batch spread over
    `group`'s processes, so N processes select what one would (None: this process's batch is the batch).
    A context rather than an argument, so every BatchTopK-derived architecture gets it without new plumbing."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def batch_group() -> BatchGroup | None:
    return _GROUP.get()


def _all_sum(value: int, group: BatchGroup | None, device: torch.device) -> int:
    if group is None:
        return value
    return int(group.all_sum(torch.tensor([value], device=device)).item())


def _candidates(pre: Tensor, k: int, group: BatchGroup | None) -> Tensor:
    """Increasing indices into `pre.flatten()` holding every value of this process that is among the global
    batch's k*n largest.

    A flat top-k over n x d_sae values is slow on CPU. Instead a few hundred rows estimate a value a
    little below the (k*n)-th largest; one pass keeps everything at or above the smallest estimate of
    any process, which holds the global top k*n whenever at least k*n values survive over all processes
    (checked). A batch too uneven for the estimate falls back to each process's flat top k*n.
    """
    n = pre.shape[0]
    flat = pre.reshape(-1)
    total = k * n * (group.world if group else 1)
    sample = pre[:: max(n // 256, 1)].reshape(-1)
    for margin in (1.25, 2.0):
        want = min(math.ceil(margin * k * n * sample.numel() / flat.numel()), sample.numel())
        floor = sample.topk(want, sorted=False).values.min()
        if group is not None:  # exact back in pre's dtype: the minimum is one of the processes' values
            floor = group.all_min(floor.float().reshape(1))[0].to(pre.dtype)
        survivors = (flat >= floor).nonzero().squeeze(1)
        if _all_sum(survivors.numel(), group, pre.device) >= total:
            if group is not None and survivors.numel() > total:  # a smaller gather: only this process's top
                vals = flat[survivors]  # `total` (and values tied with them) can be in the global top
                survivors = survivors[vals >= vals.topk(total, sorted=False).values.min()]
            return survivors
    return (flat >= flat.topk(min(total, flat.numel()), sorted=False).values.min()).nonzero().squeeze(1)


def batchtopk_pattern(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k*n largest pre-activations of the batch as (crow, cols), exactly; under `global_batch` the k*n*N
    largest of the global batch over N processes, each returning its own rows' share.

    The cut is the (k*n)-th largest value; values above it are kept and values equal to it are taken in
    global row-major order until k*n are chosen, so a process's selection does not depend on how the
    batch is split (bf16 pre-activations tie often).
    """
    n, d_sae = pre.shape
    group = batch_group()
    total = k * n * (group.world if group else 1)
    cand = _candidates(pre, k, group)
    vals = pre.reshape(-1)[cand]
    pool = vals if group is None else torch.cat(group.gather(vals.float()))
    cut = pool.topk(total, sorted=False).values.min().to(pre.dtype)
    above, tied = vals > cut, vals == cut
    n_above, n_tied = int(above.sum()), int(tied.sum())
    all_above, ties_before = n_above, 0
    if group is not None:
        per_rank = torch.stack(group.gather(torch.tensor([n_above, n_tied], device=pre.device)))
        all_above, ties_before = int(per_rank[:, 0].sum()), int(per_rank[:group.rank, 1].sum())
    take = max(0, min(total - all_above - ties_before, n_tied))
    keys = torch.cat([cand[above], cand[tied][:take]]).sort().values
    crow = torch.zeros(n + 1, dtype=torch.long, device=pre.device)
    crow[1:] = torch.bincount(torch.div(keys, d_sae, rounding_mode="floor"), minlength=n).cumsum(0)
    return crow, keys % d_sae


def global_min(values: Tensor) -> Tensor | None:
    """The smallest of `values` over the global batch (every process must call it), or None when empty."""
    smallest = values.min().float().reshape(1) if values.numel() else values.new_full((1,), math.inf,
                                                                                     dtype=torch.float32)
    group = batch_group()
    if group is not None:
        smallest = group.all_min(smallest)
    return None if torch.isinf(smallest).item() else smallest[0]


class _SparseEncode(torch.autograd.Function):
    """(x - b_dec) @ W_enc + b_enc, keep a top-k pattern, relu; gradients through the chosen latents only."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,  # type: ignore[override]
                k: int, batch_topk: bool, bf16: bool, for_backward: bool) -> tuple[Tensor, ...]:
        xc = x if b_dec is None else x - b_dec
        if bf16:
            pre = torch.addmm(b_enc.bfloat16(), xc.bfloat16(), W_enc.bfloat16())
        else:
            pre = torch.addmm(b_enc, xc, W_enc)
        crow, cols = (batchtopk_pattern if batch_topk else topk_pattern)(pre, k)
        if bf16:  # exact fp32 values of the chosen entries: bf16 only picked which ones
            sel = _csr(crow, cols, b_enc[cols], (x.shape[0], W_enc.shape[1]))
            values = torch.sparse.sampled_addmm(sel, xc, W_enc).values()
        else:
            values = pre.view(-1)[_rows(crow) * W_enc.shape[1] + cols]
        values = values.relu()
        if for_backward:  # the transposed pattern serves only the weight gradients
            t_crow, t_rows, order = _transpose_pattern(crow, cols, W_enc.shape[1])
        else:
            t_crow = t_rows = order = cols.new_empty(0)
        ctx.save_for_backward(xc, W_enc, crow, cols, values, t_crow, t_rows, order)
        ctx.mark_non_differentiable(cols, crow, t_crow, t_rows, order)
        return values, cols, crow, t_crow, t_rows, order

    @staticmethod
    def backward(ctx, g_values: Tensor, *_: Tensor):  # type: ignore[override]
        xc, W_enc, crow, cols, values, t_crow, t_rows, order = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g_values * (values > 0)
        g_latent = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)  # = grad of b_enc
        grad_x = grad_W = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = _csr(crow, cols, g, (xc.shape[0], d_sae)) @ W_enc.t()
        if ctx.needs_input_grad[1]:
            grad_W = (_transpose(t_crow, t_rows, order, g, xc.shape[0]) @ xc).t()
        if ctx.needs_input_grad[3]:  # b_dec enters as -b_dec on every row: minus the column sums of grad_x
            grad_b_dec = -(W_enc @ g_latent)
        return grad_x, grad_W, g_latent, grad_b_dec, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """sum over chosen latents of value * W_dec row, as an embedding-bag; sparse backward."""

    @staticmethod
    def forward(ctx, values: Tensor, cols: Tensor, crow: Tensor, W_dec: Tensor,  # type: ignore[override]
                t_crow: Tensor, t_rows: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(values, cols, crow, W_dec, t_crow, t_rows, order)
        return F.embedding_bag(cols, W_dec, crow, mode="sum", per_sample_weights=values, include_last_offset=True)

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        values, cols, crow, W_dec, t_crow, t_rows, order = ctx.saved_tensors
        d_sae = W_dec.shape[0]
        g_values = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(crow, cols, torch.zeros_like(values), (g_out.shape[0], d_sae))
            g_values = torch.sparse.sampled_addmm(pattern, g_out.contiguous(), W_dec.t(), beta=0.0).values()
        if ctx.needs_input_grad[3]:
            if order.numel() != cols.numel():  # encoded without grad, decoded with it
                t_crow, t_rows, order = _transpose_pattern(crow, cols, d_sae)
            grad_W = _transpose(t_crow, t_rows, order, values, g_out.shape[0]) @ g_out
        return g_values, None, None, grad_W, None, None, None


def sparse_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int,
                  batch_topk: bool = False, bf16: bool = False) -> SparseActs:
    """TopK (or BatchTopK: k per token on average) activations of x as CSR rows.

    b_dec is subtracted from x first (pass None for transcoders). Differentiable wrt W_enc, b_enc,
    b_dec and x through the chosen latents only.
    """
    return SparseActs(*_SparseEncode.apply(x, W_enc, b_enc, b_dec, k, batch_topk, bf16, torch.is_grad_enabled()))


def sparse_decode(acts: SparseActs, W_dec: Tensor) -> Tensor:
    """acts @ W_dec without a dense activation matrix (add b_dec yourself)."""
    return _SparseDecode.apply(acts.values, acts.cols, acts.crow, W_dec, acts.t_crow, acts.t_rows, acts.order)


@functools.cache
def bf16_is_faster(device: str, d_in: int, d_sae: int) -> bool:
    """Whether a bf16 encoder matmul beats fp32 on this device, timed once per (device, shape): the same test on
    CPU and CUDA (synchronised), at the batch size a training step encodes, so the choice follows the hardware
    rather than a rule of thumb. A device without bf16 keeps fp32."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return False
    rows = 4096 if dev.type == "cuda" else 512
    x, W = torch.randn(rows, d_in, device=dev), torch.randn(d_in, d_sae, device=dev)

    def best(a: Tensor, b: Tensor) -> float:
        a @ b  # warm-up
        times = []
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(x.bfloat16(), W.bfloat16()) < 0.8 * best(x, W)
