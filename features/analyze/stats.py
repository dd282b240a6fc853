"""Per-unit running statistics of the pass: counts, sums, maxima, histograms, top contexts, interval samples,
co-firing and feature x neuron correlations, each a reduction that one batch at a time updates.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from features.analyze.config import AnalyzeConfig
from features.analyze.firings import Firings, windows
from features.analyze.reservoirs import IntervalSampler, Reservoirs
from features.store import Kind

# Activation histogram: one bin below 1e-4, ten per decade up to 1e4, one above; the same edges for every unit
# so a streaming pass can bin without knowing each unit's range.
HIST_LOG_MIN, HIST_LOG_MAX, HIST_PER_DECADE = -4, 4, 10
HIST_BINS = (HIST_LOG_MAX - HIST_LOG_MIN) * HIST_PER_DECADE + 2


def hist_edges() -> list[float]:
    """Edges of the activation histogram's bins (first bin (0, 1e-4), last [1e4, inf))."""
    inner = [10 ** (HIST_LOG_MIN + i / HIST_PER_DECADE) for i in range(HIST_BINS - 1)]
    return [0.0, *inner, math.inf]


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
    """Everything streamed for one kind of unit (SAE features, or MLP neurons) over the tokens where a unit is on,
    i.e. above its `threshold` (see `on_rule`): counts, sums, maxima, histogram, examples."""

    def __init__(self, kind: Kind, threshold: Tensor, cfg: AnalyzeConfig, window: Window, cofire: int,
                 gen: torch.Generator) -> None:
        n_units = len(threshold)
        self.kind, self.n, self.window, self.cofire, self.gen = kind, n_units, window, cofire, gen
        self.threshold = threshold.float()
        self.count = torch.zeros(n_units, dtype=torch.int64)
        self.sum = torch.zeros(n_units, dtype=torch.float64)
        self.max = torch.zeros(n_units)
        self.hist = torch.zeros(n_units * HIST_BINS, dtype=torch.int64)
        self.top = Reservoirs(n_units, cfg.top_examples, window.width)
        self.intervals = IntervalSampler(n_units, cfg.intervals, cfg.interval_examples, window.width, cofire,
                                         base=self.threshold)

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
        """Offer each (sequence, unit)'s max token where the unit is on there: one example per sequence keeps the
        top contexts distinct."""
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
        live = (best > self.threshold.repeat(n_seq)).nonzero().squeeze(1)
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
