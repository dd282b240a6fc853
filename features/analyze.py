"""Feature analysis: one streaming pass of model + SAE over a token set gives, for every SAE feature and every
MLP neuron of the same layer, the statistics and examples a feature page shows.

Each quantity is a running reduction over batches, so memory depends on the number of units, never on the
number of tokens, and no tokens x units matrix outlives its batch:

- firing count, sum, max and a log-spaced histogram: scatter-adds over the batch's positive entries;
- top activating contexts, at most one per sequence (its max token): a [units, k] table merged with each
  batch's candidates by one sort (`Reservoirs`, key = -value);
- interval examples: equal-width intervals whose width doubles when a larger activation appears, each keeping
  a bottom-k random-key sample, i.e. a uniform sample without replacement. The sample of a union is the
  bottom-k of the parts' samples, so merging two intervals is exact and one pass suffices (`IntervalSampler`);
- the context window (every token's activation around the example token) and the units firing at the example
  token are read when an example enters a table, while its batch is still in memory: nothing is recomputed;
- feature x neuron sums of products for Pearson correlations: one sparse x dense matmul per batch.

What depends on weights only (logit effects through ln_final.w and W_U, decoder neighbours, neuron alignment)
and co-firing (weighted by each interval's share of firings) is computed once after the pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from features.store import FeatureStore, read_fingerprint, store_path, write_store
from sae import sparse
from sae.architectures import SAE
from sae.config import AnalyzeConfig, RunConfig
from sae.errors import SaekitError
from sae.evaluate import DENSE_THRESHOLD
from sae.models import hook_layer, hook_width, validate_hooks

KINDS = ("feature", "neuron")
# Activation histogram: one bin below 1e-4, ten per decade up to 1e4, one above; the same edges for every unit
# so a streaming pass can bin without knowing each unit's range.
HIST_LOG_MIN, HIST_LOG_MAX, HIST_PER_DECADE = -4, 4, 10
HIST_BINS = (HIST_LOG_MAX - HIST_LOG_MIN) * HIST_PER_DECADE + 2
LOGIT_HIST_BINS = 20
FLOAT16_MAX = 65504.0


def hist_edges() -> list[float]:
    """Edges of the activation histogram's bins (first bin (0, 1e-4), last [1e4, inf))."""
    inner = [10 ** (HIST_LOG_MIN + i / HIST_PER_DECADE) for i in range(HIST_BINS - 1)]
    return [0.0, *inner, math.inf]


# ---------------------------------------------------------------------------------------------
# One batch of one kind's activations


class Firings(NamedTuple):
    """A batch's positive activations as a token-major sparse list (units ascending within a token), the most
    active units at each token, and the dense matrix where the kind has one (neurons: signed values)."""

    unit: Tensor  # [nnz] int64
    token: Tensor  # [nnz] int64 row in the batch: sequence * ctx + position
    value: Tensor  # [nnz] float32, > 0
    n_tokens: int
    n_units: int
    dense: Tensor | None  # [n_tokens, n_units] or None
    at_token: Tensor  # [n_tokens, width] int64: the `width` most active firing units per token, -1 where fewer
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


def firings_from_dense(acts: Tensor, width: int) -> Firings:
    acts = acts.float()
    mask = acts > 0
    token, unit = mask.nonzero(as_tuple=True)
    at = _strongest(acts, torch.arange(acts.shape[1]), width)
    return Firings(unit, token, acts[mask], acts.shape[0], acts.shape[1], acts, at)


def feature_firings(sae: SAE, x: Tensor, width: int) -> Firings:
    """The SAE's activations on x [n, d_in]. TopK goes through the sparse kernel (no dense [n, d_sae] matrix);
    other architectures encode densely and keep the matrix for lookups."""
    x = x.to(sae.W_enc.dtype)
    if sae.architecture != "topk":
        return firings_from_dense(sae.encode(x), width)
    n, k = x.shape[0], sae.cfg.k
    acts = sparse.sparse_encode(x, sae.W_enc, sae.b_enc, None if sae.cfg.is_transcoder else sae.b_dec, k,
                                bf16=sae._use_bf16())
    values = acts.values.float()
    at = _strongest(values.view(n, k), acts.cols.view(n, k), width)
    rows = torch.arange(n).repeat_interleave(k)
    keep = values > 0
    unit, token, value = acts.cols[keep], rows[keep], values[keep]
    key = unit * n + token
    order = torch.argsort(key)
    return Firings(unit, token, value, n, sae.cfg.d_sae, None, at, (key[order], value[order]))


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


def _sort_key(group: Tensor, key: Tensor) -> Tensor:
    """One int64 ordering by group, then by the float32 key (its bits made order-preserving as an integer)."""
    bits = key.float().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude sorts first
    return group * (1 << 32) + bits + (1 << 31)


# ---------------------------------------------------------------------------------------------
# Grouped bottom-k tables


class Reservoirs:
    """For each of `groups` groups, the `size` entries with the smallest keys offered so far, with payloads.

    Keeping the smallest keys composes (the best of a union is the best of the parts' bests), so top-k by value
    (key = -value) and uniform sampling without replacement (key = a uniform random number) are both one
    vectorised merge per batch, and two groups merge exactly. Payload: sequence, position, value, the context
    window's activations (float16, NaN outside the sequence) and optionally the units firing at the token.
    """

    def __init__(self, groups: int, size: int, window: int, cofire: int = 0, cofire_units: int = 0) -> None:
        self.groups, self.size = groups, size
        id_dtype = torch.int16 if cofire_units < 2 ** 15 else torch.int32
        self.data: dict[str, Tensor] = {
            "key": torch.full((groups, size), math.inf),
            "seq": torch.full((groups, size), -1, dtype=torch.int32),
            "pos": torch.zeros((groups, size), dtype=torch.int32),
            "value": torch.zeros((groups, size)),
            "window": torch.full((groups, size, window), math.nan, dtype=torch.float16),
        }
        if cofire:
            self.data["cofire"] = torch.full((groups, size, cofire), -1, dtype=id_dtype)

    def worst(self) -> Tensor:
        """Per group, the key an offer has to beat (inf while the group is not full)."""
        return self.data["key"].max(dim=1).values

    def _flat(self, name: str) -> Tensor:
        t = self.data[name]
        return t.view(self.groups * self.size, *t.shape[2:])

    def offer(self, group: Tensor, key: Tensor, fill: Callable[[Tensor], dict[str, Tensor]]) -> None:
        """Merge candidates in; `fill(i)` gives the payload of the candidates at indices i that were kept.

        Kept entries stay in their slots (order within a group does not matter until `sorted`): only the
        slots of entries that lost are rewritten, with the winning candidates of the same group.
        """
        keep = key < self.worst()[group]
        cand = keep.nonzero().squeeze(1)
        if len(cand) == 0:
            return
        group, key = group[cand], key[cand]
        size = self.size
        touched = torch.bincount(group, minlength=self.groups).nonzero().squeeze(1)
        old_slot = (touched[:, None] * size + torch.arange(size)).flatten()
        n_old = len(old_slot)
        all_group = torch.cat([touched.repeat_interleave(size), group])
        order = torch.sort(_sort_key(all_group, torch.cat([self._flat("key")[old_slot], key]))).indices
        sorted_group = all_group[order]
        won = torch.arange(len(order)) - torch.searchsorted(sorted_group, sorted_group) < size
        is_old = order < n_old
        # Both lists are in group order, and per group as many old entries lost as candidates won.
        freed = old_slot[order[is_old & ~won]]
        winners = order[~is_old & won] - n_old
        payload = fill(cand[winners])
        payload["key"] = key[winners]
        for name in self.data:
            flat = self._flat(name)
            flat[freed] = payload[name].to(flat.dtype)

    def sorted(self) -> dict[str, Tensor]:
        """The tables with each group's entries in key order (empty slots last, seq -1)."""
        order = self.data["key"].argsort(dim=1, stable=True)
        return {name: t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t))
                for name, t in self.data.items()}


class IntervalSampler:
    """Uniform examples from equal-width activation intervals, in one pass with no max known in advance.

    Each unit has `n` intervals of width w, a power of two. Its first firing sets w so that n*w covers the max
    seen; whenever a larger max appears w doubles and neighbouring intervals merge pairwise: counts add, and the
    bottom-k samples merge exactly. At the end the unit's max lies in (n*w/2, n*w], so the top populated
    interval holds the max and between n/2 + 1 and n intervals are populated.
    """

    def __init__(self, n_units: int, n_intervals: int, size: int, window: int, cofire: int) -> None:
        self.n_units, self.n, self.size = n_units, n_intervals, size
        self.width = torch.zeros(n_units)  # 0 until the unit fires
        self.counts = torch.zeros(n_units * n_intervals, dtype=torch.int64)
        self.samples = Reservoirs(n_units * n_intervals, size, window, cofire, n_units)

    def widen(self, new_max: Tensor) -> None:
        """Make n * width cover `new_max` [units], doubling widths (merging interval pairs) as needed."""
        fresh = (self.width == 0) & (new_max > 0)
        if fresh.any():
            self.width[fresh] = torch.exp2(torch.ceil(torch.log2(new_max[fresh] / self.n)))
        while True:
            grow = ((self.width > 0) & (new_max > self.width * self.n)).nonzero().squeeze(1)
            if len(grow) == 0:
                return
            self._merge_pairs(grow)
            self.width[grow] *= 2

    def _merge_pairs(self, units: Tensor) -> None:
        n, size, half = self.n, self.size, self.n // 2
        keys = self.samples.data["key"].view(self.n_units, half, 2 * size)[units]
        best = keys.topk(size, dim=-1, largest=False).indices  # the merged interval's bottom-k sample
        base = units[:, None, None] * n * size
        src = (base + torch.arange(half)[None, :, None] * 2 * size + best).flatten()
        low = (base + torch.arange(half * size).view(1, half, size)).flatten()
        high = (units[:, None] * n * size + half * size + torch.arange(half * size)).flatten()
        for name in self.samples.data:
            flat = self.samples._flat(name)
            merged = flat[src]
            flat[high] = math.inf if name == "key" else (-1 if name in ("seq", "cofire") else
                                                         (math.nan if name == "window" else 0))
            flat[low] = merged
        counts = self.counts.view(self.n_units, n)
        merged_counts = counts[units].view(len(units), half, 2).sum(-1)
        counts[units] = torch.cat([merged_counts, torch.zeros_like(merged_counts)], dim=1)

    def bins(self, unit: Tensor, value: Tensor) -> Tensor:
        return (value / self.width[unit]).floor_().long().clamp_(0, self.n - 1)


# ---------------------------------------------------------------------------------------------
# Per-kind running statistics


@dataclass
class Window:
    """Which tokens around an example token are stored, and the batch geometry to find them."""

    before: int
    after: int
    ctx: int

    @property
    def width(self) -> int:
        return self.before + self.after + 1


class UnitAccumulator:
    """Everything streamed for one kind of unit (SAE features, or MLP neurons)."""

    def __init__(self, kind: str, n_units: int, cfg: AnalyzeConfig, window: Window, cofire: int,
                 gen: torch.Generator) -> None:
        self.kind, self.n, self.window, self.cofire, self.gen = kind, n_units, window, cofire, gen
        self.count = torch.zeros(n_units, dtype=torch.int64)
        self.sum = torch.zeros(n_units, dtype=torch.float64)
        self.max = torch.zeros(n_units)
        self.hist = torch.zeros(n_units * HIST_BINS, dtype=torch.int64)
        self.top = Reservoirs(n_units, cfg.top_examples, window.width)
        self.intervals = IntervalSampler(n_units, cfg.intervals, cfg.interval_examples, window.width, cofire)

    def _payload(self, f: Firings, first_seq: int, unit: Tensor, token: Tensor, value: Tensor,
                 cofire: int) -> dict[str, Tensor]:
        w = self.window
        out = {"seq": first_seq + token // w.ctx, "pos": token % w.ctx, "value": value,
               "window": windows(f, unit, token, w.before, w.after, w.ctx)}
        if cofire:
            out["cofire"] = f.at_token[token]
        return out

    def update(self, f: Firings, first_seq: int) -> None:
        u, t, v = f.unit, f.token, f.value
        self.count += torch.bincount(u, minlength=self.n)
        self.sum += torch.zeros(self.n).index_add_(0, u, v).double()
        self.max = torch.maximum(self.max, torch.zeros(self.n).scatter_reduce_(0, u, v, "amax"))
        hb = ((v.log10() - HIST_LOG_MIN) * HIST_PER_DECADE).floor_().long().add_(1).clamp_(0, HIST_BINS - 1)
        self.hist += torch.bincount(u * HIST_BINS + hb, minlength=self.n * HIST_BINS)
        self._update_top(f, first_seq)
        self.intervals.widen(self.max)
        group = u * self.intervals.n + self.intervals.bins(u, v)
        self.intervals.counts += torch.bincount(group, minlength=len(self.intervals.counts))
        keys = torch.rand(len(v), generator=self.gen)
        self.intervals.samples.offer(group, keys, lambda i: self._payload(f, first_seq, u[i], t[i], v[i],
                                                                          self.cofire))

    def _update_top(self, f: Firings, first_seq: int) -> None:
        """Offer each (sequence, unit)'s max token: one example per sequence keeps the top contexts distinct."""
        ctx, n = self.window.ctx, self.n
        n_seq = f.n_tokens // ctx
        if f.dense is not None:
            best, arg = f.dense.reshape(n_seq, ctx, n).max(dim=1)
            best, arg = best.flatten(), arg.flatten()
        else:
            slot = (f.token // ctx) * n + f.unit
            best = torch.zeros(n_seq * n).scatter_reduce_(0, slot, f.value, "amax")
            winner = f.value == best[slot]
            arg = torch.zeros(n_seq * n, dtype=torch.int64).scatter_(0, slot[winner], (f.token % ctx)[winner])
        live = (best > 0).nonzero().squeeze(1)
        unit = live % n

        def fill(i: Tensor) -> dict[str, Tensor]:
            slot = live[i]
            token = (slot // n) * ctx + arg[slot]
            return self._payload(f, first_seq, slot % n, token, best[slot], 0)

        self.top.offer(unit, -best[live], fill)


class Correlation:
    """Streaming Pearson correlation of every feature with every neuron: sums of products features x neurons
    (float32 [d_sae, d_mlp]; 100 MB at 16k features), one sparse (features) x dense (neurons) matmul per batch."""

    def __init__(self, n_features: int, n_neurons: int) -> None:
        self.prod = torch.zeros(n_features, n_neurons)
        self.f_sum = torch.zeros(n_features, dtype=torch.float64)
        self.f_sq = torch.zeros(n_features, dtype=torch.float64)
        self.n_sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.n_sq = torch.zeros(n_neurons, dtype=torch.float64)
        self.tokens = 0

    def update(self, feats: Firings, neurons: Tensor) -> None:
        n_f = len(self.f_sum)
        order = torch.argsort(feats.unit, stable=True)
        crow = torch.zeros(n_f + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(feats.unit, minlength=n_f).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow, feats.token[order], feats.value[order], (n_f, feats.n_tokens))
            self.prod.addmm_(csr, neurons.float())
        self.f_sum += torch.zeros(n_f).index_add_(0, feats.unit, feats.value).double()
        self.f_sq += torch.zeros(n_f).index_add_(0, feats.unit, feats.value.square()).double()
        self.n_sum += neurons.sum(0).double()
        self.n_sq += neurons.square().sum(0).double()
        self.tokens += feats.n_tokens

    def top(self, n: int, chunk: int = 2048) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(neuron ids, r) [d_sae, n] per feature and (feature ids, r) [d_mlp, n] per neuron, highest r first."""
        N = max(self.tokens, 1)
        f_mean, n_mean = self.f_sum / N, self.n_sum / N
        f_std = (self.f_sq / N - f_mean ** 2).clamp_min(0).sqrt().float()
        n_std = (self.n_sq / N - n_mean ** 2).clamp_min(0).sqrt().float()
        f_mean, n_mean = f_mean.float(), n_mean.float()
        n_f, n_n = self.prod.shape
        k_n, k_f = min(n, n_n), min(n, n_f)
        f_ids, f_r = torch.zeros(n_f, k_n, dtype=torch.int64), torch.zeros(n_f, k_n)
        best_r = torch.full((n_n, k_f), -math.inf)
        best_ids = torch.zeros(n_n, k_f, dtype=torch.int64)
        for lo in range(0, n_f, chunk):
            hi = min(lo + chunk, n_f)
            cov = self.prod[lo:hi] / N - f_mean[lo:hi, None] * n_mean[None, :]
            r = cov / (f_std[lo:hi, None] * n_std[None, :])
            r = torch.where(torch.isfinite(r), r, -math.inf)  # a unit that never varies has no correlation
            top = r.topk(k_n, dim=1)
            f_ids[lo:hi], f_r[lo:hi] = top.indices, top.values
            both_r = torch.cat([best_r, r.t()], dim=1)
            both_ids = torch.cat([best_ids, torch.arange(lo, hi).expand(n_n, hi - lo)], dim=1)
            top = both_r.topk(k_f, dim=1)
            best_r, best_ids = top.values, both_ids.gather(1, top.indices)
        return (f_ids, f_r), (best_ids, best_r)


# ---------------------------------------------------------------------------------------------
# Weight-only per-unit quantities


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


def cofiring(intervals: IntervalSampler, n: int, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per unit, the n units (same kind) that most often fire with it, as (ids, share of its firings).

    Estimated on the interval samples, each weighted by its interval's count over its sample size
    (Horvitz-Thompson), which makes the stratified sample stand for every firing; "fires with it" means
    among the most active units at that token (the `cofire` width of the sampler).
    """
    units, n_int, size = intervals.n_units, intervals.n, intervals.size
    data = intervals.samples.data
    width = data["cofire"].shape[-1]
    filled = (data["seq"] >= 0).view(units, n_int, size)
    per_interval = intervals.counts.view(units, n_int).double() / filled.sum(-1).clamp_min(1)
    weight = (per_interval[..., None] * filled).float()  # [units, n_int, size]
    n = min(n, units - 1)
    ids, share = torch.zeros(units, max(n, 0), dtype=torch.int64), torch.zeros(units, max(n, 0))
    if n <= 0:
        return ids, share
    for lo in range(0, units, chunk):
        hi = min(lo + chunk, units)
        partner = data["cofire"].view(units, -1)[lo:hi].long()
        w = weight[lo:hi, :, :, None].expand(-1, -1, -1, width).reshape(hi - lo, -1)
        me = torch.arange(lo, hi)[:, None]
        w = torch.where((partner >= 0) & (partner != me), w, 0.0)
        acc = torch.zeros(hi - lo, units).scatter_add_(1, partner.clamp(min=0), w)
        total = weight[lo:hi].sum(dim=(1, 2)).clamp_min(1e-12)
        top = acc.topk(n, dim=1)
        ids[lo:hi], share[lo:hi] = top.indices, top.values / total[:, None]
    return ids, share


def feature_directions(model: HookedTransformer, sae: SAE) -> Tensor | None:
    """Decoder rows in the residual stream, where the SAE's output lives there (or in the MLP's neurons, then
    through W_out); None for other hooks (e.g. mlp.hook_pre), which have no direct logit effect."""
    hook = sae.cfg.hook_name_out or sae.cfg.hook_name
    W_dec = sae.W_dec.detach().float().cpu()
    if hook.endswith(".mlp.hook_post"):
        return W_dec @ model.blocks[hook_layer(hook)].mlp.W_out.detach().float().cpu()
    if hook_width(model, hook) == model.cfg.d_model and ".mlp." not in hook:
        return W_dec
    return None


# ---------------------------------------------------------------------------------------------
# The pass


@dataclass
class KindResult:
    """One kind's results as tensors, units in index order; `store.write_store` turns them into rows."""

    kind: str
    n_units: int
    n_fires: Tensor  # [U] int64
    sum_act: Tensor  # [U] float64, over firing tokens
    max_act: Tensor  # [U]
    hist: Tensor  # [U, HIST_BINS] int64
    top: dict[str, Tensor]  # seq, pos, value, window: [U, k(, w)], value-descending, seq -1 where empty
    interval_width: Tensor  # [U]; interval j is [j*w, (j+1)*w)
    interval_counts: Tensor  # [U, n_intervals] int64
    intervals: dict[str, Tensor]  # seq, pos, value, window: [U, n_intervals, m(, w)]
    cofiring: tuple[Tensor, Tensor]  # (ids, share) [U, n]
    correlated: tuple[Tensor, Tensor] | None = None  # (other kind's ids, Pearson r) [U, n]
    neighbours: tuple[Tensor, Tensor] | None = None  # (ids, cosine of output directions) [U, n]
    aligned: tuple[Tensor, Tensor] | None = None  # features: (neuron ids, cosine decoder row vs W_out row)
    logits: dict[str, Tensor] | None = None  # see logit_effects


@dataclass
class Analysis:
    kinds: dict[str, KindResult]
    tokens: Tensor  # [n_seq, ctx] the analysed sequences
    sources: list[tuple[str, int]]  # (split, index in split) per analysed sequence
    settings: dict[str, Any] = field(default_factory=dict)  # hooks, window, bins, notes: stored as metadata

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def check_fit(model: HookedTransformer, sae: SAE) -> str:
    """Refuse an SAE that does not belong to this model; return the hook of the same layer's MLP neurons."""
    cfg = sae.cfg
    if cfg.model_name and cfg.model_name != model.cfg.model_name:
        raise SaekitError(f"model mismatch: the SAE was trained on '{cfg.model_name}' (cfg.json metadata."
                          f"model_name) but the loaded model is '{model.cfg.model_name}'; set model.name to the "
                          "SAE's model or analyse an SAE trained on this one")
    if not cfg.hook_name:
        raise SaekitError("the SAE does not say which hook it reads (cfg.json metadata.hook_name is empty); add it, "
                          "e.g. \"hook_name\": \"blocks.6.hook_mlp_out\"")
    hooks = [cfg.hook_name] + ([cfg.hook_name_out] if cfg.hook_name_out else [])
    validate_hooks(model, hooks)
    for hook, width in ((cfg.hook_name, cfg.d_in), (cfg.hook_name_out, cfg.d_out)):
        if hook and hook_width(model, hook) != width:
            raise SaekitError(f"width mismatch: the SAE expects {width}-wide activations at {hook}, but model "
                              f"'{model.cfg.model_name}' has {hook_width(model, hook)} there; the SAE was trained "
                              "on another model or hook")
    if cfg.input_scale != 1.0:
        raise SaekitError("analyse an exported SAE (scaling folded into the weights), not a training-time one")
    return f"blocks.{hook_layer(cfg.hook_name)}.mlp.hook_post"


def model_batches(model: HookedTransformer, tokens: Tensor, hooks: list[str],
                  batch_size: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """(first sequence, {hook: [batch tokens, d]}) per batch, the model run only to the deepest hook's layer."""
    stop = max(hook_layer(h) for h in hooks) + 1
    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        captured[hook.name] = act.reshape(-1, act.shape[-1])

    with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
        for start in range(0, len(tokens), batch_size):
            model(tokens[start:start + batch_size].to(model.cfg.device), stop_at_layer=stop)
            yield start, {h: captured[h].cpu() for h in hooks}


@torch.inference_mode()
def analyze(model: HookedTransformer, sae: SAE, tokens: Tensor, cfg: AnalyzeConfig,
            sources: list[tuple[str, int]] | None = None,
            batches: Iterable[tuple[int, dict[str, Tensor]]] | None = None, progress: bool = True) -> Analysis:
    """Analyse every feature of `sae` and (cfg.neurons) every neuron of its layer over `tokens` [n_seq, ctx].

    `batches` replaces the model run (e.g. rows read from an activation cache): (first sequence index,
    {hook: activations [batch tokens, d]}) covering `tokens` in order, batch by batch.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    neuron_hook = check_fit(model, sae)
    sae = sae.cpu().eval()
    n_seq, ctx = tokens.shape
    if n_seq == 0:
        raise SaekitError("no sequences to analyse; raise analyze.sequences or the corpus size")
    hooks = list(dict.fromkeys([sae.cfg.hook_name] + ([neuron_hook] if cfg.neurons else [])))
    window = Window(cfg.window_before, cfg.window_after, ctx)
    gen = torch.Generator().manual_seed(cfg.seed)
    k_cofire = min(32, sae.cfg.d_sae)
    acc = {"feature": UnitAccumulator("feature", sae.cfg.d_sae, cfg, window, k_cofire, gen)}
    corr = None
    if cfg.neurons:
        d_mlp = model.cfg.d_mlp
        n_cofire = min(32, d_mlp)
        acc["neuron"] = UnitAccumulator("neuron", d_mlp, cfg, window, n_cofire, gen)
        corr = Correlation(sae.cfg.d_sae, d_mlp)
    source = batches if batches is not None else model_batches(model, tokens, hooks, cfg.batch_size)
    bar = tqdm(total=tokens.numel(), unit="tok", unit_scale=True, desc="analysing", disable=not progress,
               dynamic_ncols=True)
    try:
        for first, acts in source:
            feats = feature_firings(sae, acts[sae.cfg.hook_name].float(), k_cofire)
            if feats.n_tokens % ctx:
                raise SaekitError(f"a batch of {feats.n_tokens} activations is not whole sequences of {ctx} tokens")
            acc["feature"].update(feats, first)
            if corr is not None:
                neurons = firings_from_dense(acts[neuron_hook], n_cofire)
                acc["neuron"].update(neurons, first)
                corr.update(feats, neurons.dense)
            bar.update(feats.n_tokens)
    finally:
        bar.close()
        close = getattr(source, "close", None)
        if close is not None:  # a generator: remove the model's hooks now, not at garbage collection
            close()
    t_pass, cpu_pass = time.perf_counter() - t0, time.process_time() - cpu0

    results = {kind: _finish(a, cfg.n_related) for kind, a in acc.items()}
    if corr is not None:
        results["feature"].correlated, results["neuron"].correlated = corr.top(cfg.n_related)
    f_dirs = feature_directions(model, sae)
    layer = hook_layer(sae.cfg.hook_name)
    W_out = model.blocks[layer].mlp.W_out.detach().float().cpu()
    with_logits = {k: d for k, d in (("feature", f_dirs), ("neuron", W_out if cfg.neurons else None))
                   if d is not None}
    if with_logits:  # one pass over W_U for both kinds
        effects = logit_effects(model, torch.cat(list(with_logits.values())), cfg.n_logits)
        lo = 0
        for kind, d in with_logits.items():
            results[kind].logits = {name: t[lo:lo + len(d)] for name, t in effects.items()}
            lo += len(d)
    if f_dirs is not None:
        results["feature"].neighbours = cosine_top(f_dirs, f_dirs, cfg.n_related, exclude_self=True)
        if cfg.neurons:
            results["feature"].aligned = cosine_top(f_dirs, W_out, 3, exclude_self=False, by_abs=True)
    else:
        results["feature"].neighbours = cosine_top(sae.W_dec.detach(), sae.W_dec.detach(), cfg.n_related, True)
    if cfg.neurons:
        results["neuron"].neighbours = cosine_top(W_out, W_out, cfg.n_related, exclude_self=True)
    _, ln_note = ln_final_weight(model)
    settings = {
        "sae_hook": sae.cfg.hook_name, "sae_hook_out": sae.cfg.hook_name_out, "neuron_hook": neuron_hook,
        "kinds": list(results), "n_tokens": tokens.numel(), "n_sequences": n_seq, "context_size": ctx,
        "window_before": cfg.window_before, "window_after": cfg.window_after, "hist_edges": hist_edges(),
        "firing": "activation > 0 (neurons: the signed blocks.L.mlp.hook_post value > 0)",
        "dense_threshold": DENSE_THRESHOLD,
        "logit_effect": f"(direction * ln_final.w) @ W_U, {ln_note}; direction = decoder row (through W_out for an "
                        "mlp.hook_post SAE) for features, W_out row for neurons; b_U and the norm's scale left "
                        "out; the logit histogram covers a fixed random sample of 8192 vocabulary tokens",
        "neighbours": "cosine of output directions (decoder rows / W_out rows)",
        "cofiring": "share of the unit's firings (interval samples, weighted by interval counts) at which the "
                    "other unit is among the 32 most active units of its kind at that token",
        "correlated": "Pearson correlation over all analysed tokens of feature activations and signed neuron "
                      "activations",
        "aligned": "cosine between a feature's decoder direction and a neuron's W_out row, ranked by |cosine|",
        "analyze_config": asdict(cfg), "pass_seconds": round(t_pass, 2), "pass_cpu_seconds": round(cpu_pass, 2),
        "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
    }
    return Analysis(results, tokens.cpu(), sources or [("tokens", i) for i in range(n_seq)], settings)


def _finish(a: UnitAccumulator, n_related: int) -> KindResult:
    top = a.top.sorted()
    intervals = a.intervals.samples.sorted()  # per interval in key (random) order; re-sorted by value below
    m = a.intervals.size
    shaped = {k: v.view(a.n, a.intervals.n, m, *v.shape[2:]) for k, v in intervals.items() if k != "cofire"}
    by_value = torch.where(shaped["seq"] >= 0, -shaped["value"], math.inf).argsort(dim=2, stable=True)
    shaped = {k: v.gather(2, by_value.view(*by_value.shape, *([1] * (v.dim() - 3))).expand_as(v))
              for k, v in shaped.items()}
    return KindResult(
        kind=a.kind, n_units=a.n, n_fires=a.count, sum_act=a.sum, max_act=a.max,
        hist=a.hist.view(a.n, HIST_BINS), top={k: v for k, v in top.items() if k != "key"},
        interval_width=a.intervals.width, interval_counts=a.intervals.counts.view(a.n, a.intervals.n),
        intervals={k: v for k, v in shaped.items() if k != "key"}, cofiring=cofiring(a.intervals, n_related))


# ---------------------------------------------------------------------------------------------
# From a run: which tokens, which source, skip when up to date


def select_tokens(splits: dict[str, Tensor], cfg: AnalyzeConfig) -> tuple[Tensor, list[tuple[str, int]]]:
    """The analysed sequences: the configured split(s) in order, held-out first, capped at cfg.sequences."""
    names = {"held_out": ["held_out"], "train": ["train"], "held_out+train": ["held_out", "train"]}[cfg.split]
    parts, sources = [], []
    left = cfg.sequences
    for name in names:
        t = splits[name] if left is None else splits[name][:left]
        parts.append(t)
        sources += [(name, i) for i in range(len(t))]
        if left is not None:
            left -= len(t)
    tokens = torch.cat(parts)
    if len(tokens) == 0:
        raise SaekitError(f"no sequences to analyse: split '{cfg.split}' is empty; raise corpus.max_sequences or "
                          "corpus.held_out_fraction, or set analyze.split: held_out+train")
    return tokens, sources


def cache_batches(cache_dir: Path, hooks: list[str], model_name: str, train_fingerprint: str, n_seq: int,
                  ctx: int, batch_size: int) -> Iterator[tuple[int, dict[str, Tensor]]] | str:
    """Batches read from the run's activation cache (the first n_seq train sequences), or why it cannot serve."""
    from sae.cache import CacheReader, hook_dir

    readers = {}
    for hook in hooks:
        folder = hook_dir(cache_dir, hook)
        if not (folder / "manifest.json").is_file():
            return f"the cache has no {hook} (add it to cache.hooks and rerun `saekit cache`)"
        try:
            readers[hook] = CacheReader(folder, expect={"model": model_name, "corpus_fingerprint": train_fingerprint,
                                                        "context_size": ctx})
        except SaekitError as exc:
            return str(exc)

    def read() -> Iterator[tuple[int, dict[str, Tensor]]]:
        for start in range(0, n_seq, batch_size):
            rows = np.arange(start * ctx, min(n_seq, start + batch_size) * ctx)
            yield start, {h: r.activations(rows) for h, r in readers.items()}

    return read()


def sae_fingerprint(sae_dir: Path) -> str:
    """sha256 over the SAE's weight files: the identity the labeler's tables belong to."""
    from sae.io import sha256_file

    weights = sorted(p for p in Path(sae_dir).glob("*.safetensors") if p.name != "sparsity.safetensors")
    return hashlib.sha256("".join(sha256_file(p) for p in weights).encode()).hexdigest()


def input_fingerprint(sae_sha: str, tokens: Tensor, cfg: AnalyzeConfig, model_name: str) -> str:
    """What a store was built from: SAE weights, tokens, analysis settings, model. Equal means up to date."""
    from sae.corpus import token_fingerprint

    parts = [sae_sha, token_fingerprint(tokens), json.dumps(asdict(cfg), sort_keys=True), model_name]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def vocab_strings(model: HookedTransformer) -> list[str]:
    """Each token id's text, as the store shows it (placeholders where the model has no tokenizer)."""
    n = model.cfg.d_vocab
    tok = model.tokenizer
    if tok is None:
        return [f"<{i}>" for i in range(n)]
    known = min(n, len(tok))
    return list(tok.batch_decode([[i] for i in range(known)])) + [f"<{i}>" for i in range(known, n)]


def run_analysis(cfg: RunConfig, model: HookedTransformer, sae_dir: Path, splits: dict[str, Tensor],
                 overwrite: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Analyse the SAE in `sae_dir` over the run's tokens and write its store; skipped (False) when the store
    is already built from the same SAE, tokens, settings and model, unless `overwrite`."""
    from sae.config import config_to_dict
    from sae.corpus import token_fingerprint
    from sae.export import load_sae

    sae_dir = Path(sae_dir)
    sae = load_sae(sae_dir)
    neuron_hook = check_fit(model, sae)
    a = cfg.analyze
    tokens, sources = select_tokens(splits, a)
    path = store_path(sae_dir)
    sae_sha = sae_fingerprint(sae_dir)
    fingerprint = input_fingerprint(sae_sha, tokens, a, model.cfg.model_name)
    eval_file = sae_dir / "eval.json"
    context = {"eval": json.loads(eval_file.read_text()) if eval_file.is_file() else None,
               "run_config": config_to_dict(cfg)}
    if not overwrite and read_fingerprint(path) == fingerprint:
        with FeatureStore.open(path, writable=True) as store:  # eval or unrelated settings may have changed
            changed = {k: v for k, v in context.items() if store.meta.get(k) != v}
            if changed:
                store.set_meta(changed)
        return path, False
    batches, source = None, "model"
    if a.source != "model":
        hooks = list(dict.fromkeys([sae.cfg.hook_name] + ([neuron_hook] if a.neurons else [])))
        if any(split != "train" for split, _ in sources):
            found: Iterator[tuple[int, dict[str, Tensor]]] | str = (
                "the analysed sequences include held-out ones and the cache holds the train split only "
                "(set analyze.split: train)")
        else:
            found = cache_batches(cfg.run_dir / "cache", hooks, model.cfg.model_name,
                                  token_fingerprint(splits["train"]), len(tokens), tokens.shape[1], a.batch_size)
        if isinstance(found, str):
            if a.source == "cache":
                raise SaekitError(f"analyze.source is 'cache' but {found}; or set analyze.source: auto")
        else:
            batches, source = found, "cache"
    analysis = analyze(model, sae, tokens, a, sources, batches, progress=progress)
    analysis.settings["source"] = source
    meta = {"sae_id": sae_dir.name, "model_name": model.cfg.model_name, "fingerprint": fingerprint,
            "sae_sha256": sae_sha, "sae": json.loads((sae_dir / "cfg.json").read_text()), **context}
    write_store(path, analysis, vocab=vocab_strings(model), meta=meta)
    return path, True
