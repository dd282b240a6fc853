"""Per-unit quantities that depend on weights only, computed once after the pass: logit effects (through
ln_final.w and W_U), nearest units by output direction, and feature-neuron alignment.

Top-n searches pick candidates with a bf16 matmul and recompute the chosen ones exactly in float32, so
the reported values are exact while the search costs a bf16 pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer

from sae.hooks import hook_layer, hook_width, sae_hooks
from sae.saes import SAE

LOGIT_HIST_BINS = 20


def ln_final_weight(model: HookedTransformer) -> tuple[Tensor, str]:
    """The final norm's weight (ones if it was folded into W_U) and a note saying which, for the store."""
    w = getattr(model.ln_final, "w", None)
    if w is None:
        return torch.ones(model.cfg.d_model), "ln_final has no weight (folded into W_U or absent)"
    return w.detach().float().cpu(), "ln_final.w applied"


def _top_exact(approx: Tensor, exact: Callable[[Tensor], Tensor], n: int, largest: bool = True) -> tuple[Tensor,
                                                                                                     Tensor]:
    """Top n per row: candidates picked from a cheap (bf16) score with a few spare, their scores recomputed
    exactly by `exact(ids)` -> [rows, candidates], then the final n taken from the exact scores."""
    spare = min(n + 8, approx.shape[1])
    ids = approx.topk(spare, dim=1, largest=largest).indices
    values = exact(ids)
    best = values.topk(n, dim=1, largest=largest)
    return ids.gather(1, best.indices), best.values


def logit_effects(model: HookedTransformer, directions: Tensor, n: int, chunk: int = 256,
                  hist_sample: int = 8192) -> dict[str, Tensor]:
    """Top and bottom n output tokens of each direction [units, d_model] through ln_final.w and W_U, and a
    LOGIT_HIST_BINS-bin histogram of its effect over a fixed sample of `hist_sample` vocabulary tokens.

    b_U and the norm's scale are left out: they do not depend on the direction. LayerNorm models also
    subtract the direction's mean, as LayerNorm would. Candidates come from a bf16 matmul over the whole
    vocabulary; the reported values are recomputed in float32.
    """
    w, _ = ln_final_weight(model)
    W_U = model.W_U.detach().float().cpu()
    W_U_rows = W_U.t().contiguous()  # [vocab, d_model], to recompute chosen tokens exactly
    W_U_bf16 = W_U.bfloat16()
    vocab = W_U.shape[1]
    sample = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:hist_sample].sort().values
    W_U_sample = W_U[:, sample].contiguous()
    dirs = directions.float().cpu()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        dirs = dirs - dirs.mean(dim=1, keepdim=True)
    dirs = dirs * w
    n = min(n, vocab)
    units = len(dirs)
    out = {"pos_ids": torch.zeros(units, n, dtype=torch.int64), "pos_values": torch.zeros(units, n),
           "neg_ids": torch.zeros(units, n, dtype=torch.int64), "neg_values": torch.zeros(units, n),
           "hist": torch.zeros(units, LOGIT_HIST_BINS, dtype=torch.int64), "hist_lo": torch.zeros(units),
           "hist_hi": torch.zeros(units)}
    for lo in range(0, units, chunk):
        d = dirs[lo:lo + chunk]
        approx = d.bfloat16() @ W_U_bf16

        def exact(ids: Tensor, d: Tensor = d) -> Tensor:
            return torch.einsum("rd,rkd->rk", d, W_U_rows[ids])

        sl = slice(lo, lo + len(d))
        out["pos_ids"][sl], out["pos_values"][sl] = _top_exact(approx, exact, n)
        out["neg_ids"][sl], out["neg_values"][sl] = _top_exact(approx, exact, n, largest=False)
        eff = d @ W_U_sample
        mn, mx = eff.min(dim=1).values, eff.max(dim=1).values
        scale = LOGIT_HIST_BINS / (mx - mn).clamp_min(1e-12)
        bins = ((eff - mn[:, None]) * scale[:, None]).long().clamp_(0, LOGIT_HIST_BINS - 1)
        rows = torch.arange(len(eff))[:, None] * LOGIT_HIST_BINS
        hist = torch.bincount((bins + rows).flatten(), minlength=len(eff) * LOGIT_HIST_BINS)
        out["hist"][sl], out["hist_lo"][sl], out["hist_hi"][sl] = hist.view(-1, LOGIT_HIST_BINS), mn, mx
    return out


def cosine_top(a: Tensor, b: Tensor, n: int, exclude_self: bool, by_abs: bool = False,
               chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row of a, the n rows of b with the highest cosine (or |cosine|), as (ids, signed cosines)."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    n = max(min(n, len(b) - (1 if exclude_self else 0)), 0)
    ids, vals = torch.zeros(len(a), n, dtype=torch.int64), torch.zeros(len(a), n)
    if n == 0:
        return ids, vals
    b_bf16 = b.t().bfloat16()
    for lo in range(0, len(a), chunk):
        rows = a[lo:lo + chunk]
        score = (rows.bfloat16() @ b_bf16).float()
        if by_abs:
            score = score.abs()
        if exclude_self:
            r = torch.arange(len(rows))
            score[r, r + lo] = -math.inf

        def exact(cand: Tensor, rows: Tensor = rows, lo: int = lo) -> Tensor:
            sims = torch.einsum("rd,rkd->rk", rows, b[cand])
            sims = sims.abs() if by_abs else sims
            if exclude_self:
                sims[cand == torch.arange(lo, lo + len(rows))[:, None]] = -math.inf
            return sims

        top, _ = _top_exact(score, exact, n)
        ids[lo:lo + len(rows)] = top
        vals[lo:lo + len(rows)] = torch.einsum("rd,rkd->rk", rows, b[top])
    return ids, vals


def feature_directions(model: HookedTransformer, sae: SAE) -> Tensor | None:
    """Decoder rows in the residual stream, where the SAE's output lives there (or in the MLP's neurons, then
    through W_out); None for other hooks (e.g. mlp.hook_pre), which have no direct logit effect."""
    _, hook = sae_hooks(sae)
    W_dec = sae.W_dec.detach().float().cpu()
    if hook.endswith(".mlp.hook_post"):
        return W_dec @ model.blocks[hook_layer(hook)].mlp.W_out.detach().float().cpu()
    if hook_width(model, hook) == model.cfg.d_model and ".mlp." not in hook:
        return W_dec
    return None
