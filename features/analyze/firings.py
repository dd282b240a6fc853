"""One batch of one kind's activations in the forms the running statistics need: a sparse token-major list of
firings, the strongest units per token, and a way to read any unit's activations around any token.

TopK SAEs never materialise the dense [tokens, d_sae] matrix: their firings come from the sparse kernel,
and context windows are read from a unit-major copy of the list by binary search.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from sae.saes import SAE, kernels

FLOAT16_MAX = 65504.0  # windows are stored as float16


class Firings(NamedTuple):
    """A batch's activations above each unit's on threshold (see `on_rule`) as a token-major sparse list (units
    ascending within a token), the most active units that are on at each token, and the dense matrix where the
    kind has one (neurons: signed values)."""

    unit: Tensor  # [nnz] int64
    token: Tensor  # [nnz] int64 row in the batch: sequence * ctx + position
    value: Tensor  # [nnz] float32, > the unit's threshold (>= 0)
    n_tokens: int
    n_units: int
    dense: Tensor | None  # [n_tokens, n_units] or None
    at_token: Tensor  # [n_tokens, width] int64: the `width` most active units on per token, -1 where fewer
    unit_major: tuple[Tensor, Tensor] | None = None  # sparse kinds: (unit * n_tokens + token sorted, values)


def _strongest(values: Tensor, ids: Tensor, width: int) -> Tensor:
    """[n, width] ids of the largest positive values per row (-1 padding)."""
    out = torch.full((values.shape[0], width), -1, dtype=torch.int64)
    if values.shape[1] > width:
        top = values.topk(width, dim=1)
        values, ids = top.values, ids.gather(1, top.indices) if ids.dim() == 2 else top.indices
    elif ids.dim() == 1:
        ids = ids.expand_as(values)
    out[:, :values.shape[1]] = torch.where(values > 0, ids, -1)
    return out


def firings_from_dense(acts: Tensor, width: int, threshold: Tensor | None = None) -> Firings:
    """The entries of acts [tokens, units] above each unit's on threshold (`on_rule`; None: 0); `dense` keeps
    every value (signed, for neurons) for windows and correlations."""
    acts = acts.float()
    mask = acts > (0.0 if threshold is None else threshold[None, :])
    token, unit = mask.nonzero(as_tuple=True)
    at = _strongest(torch.where(mask, acts, 0.0), torch.arange(acts.shape[1]), width)
    return Firings(unit, token, acts[mask], acts.shape[0], acts.shape[1], acts, at)


def feature_firings(sae: SAE, x: Tensor, width: int) -> Firings:
    """The SAE's activations on x [n, d_in]. TopK goes through the sparse kernel (no dense [n, d_sae] matrix);
    other architectures encode densely and keep the matrix for lookups."""
    x = x.to(sae.W_enc.dtype)
    if sae.architecture != "topk":
        return firings_from_dense(sae.encode(x), width)
    n, k = x.shape[0], sae.hyper.k
    acts = kernels.sparse_encode(x, sae.W_enc, sae.b_enc, None if sae.shape.is_transcoder else sae.b_dec, k,
                                 bf16=sae._use_bf16())
    values = acts.values.float()
    at = _strongest(values.view(n, k), acts.cols.view(n, k), width)
    rows = torch.arange(n).repeat_interleave(k)
    keep = values > 0
    unit, token, value = acts.cols[keep], rows[keep], values[keep]
    key = unit * n + token
    order = torch.argsort(key)
    return Firings(unit, token, value, n, sae.shape.d_sae, None, at, (key[order], value[order]))


def windows(f: Firings, unit: Tensor, token: Tensor, before: int, after: int, ctx: int) -> Tensor:
    """[n, before + 1 + after]: each unit's activations around its batch row `token`, NaN outside the sequence.

    A sparse kind reads each window as one range of its unit-major list (two binary searches per window,
    whatever its width) and scatters the few firings it holds into zeros.
    """
    pos = token % ctx
    q = pos[:, None] + torch.arange(-before, after + 1)
    inside = (q >= 0) & (q < ctx)
    if f.dense is not None:
        acts = f.dense[(token - pos)[:, None] + q.clamp(0, ctx - 1), unit[:, None]]
    else:
        assert f.unit_major is not None
        keys, values = f.unit_major
        base = unit * f.n_tokens
        lo = torch.searchsorted(keys, base + token - torch.minimum(pos, torch.tensor(before)))
        hi = torch.searchsorted(keys, base + token + torch.clamp(ctx - 1 - pos, max=after), right=True)
        counts = hi - lo
        which = torch.repeat_interleave(torch.arange(len(unit)), counts)
        entry = lo[which] + torch.arange(len(which)) - (torch.cumsum(counts, 0) - counts)[which]
        col = keys[entry] - base[which] - token[which] + before
        acts = torch.zeros(q.shape)
        acts[which, col] = values[entry]
    return torch.where(inside, acts.float().clamp(-FLOAT16_MAX, FLOAT16_MAX), math.nan)
