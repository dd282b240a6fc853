"""Grouped bottom-k tables: the data structure behind top examples and interval samples.

Keeping the smallest keys composes (the best of a union is the best of the parts' bests), so top-k by value
(key = -value) and uniform sampling without replacement (key = a uniform random number) are both one
vectorised merge per batch, and memory depends on the number of units, never on the number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _sort_key(group: Tensor, key: Tensor) -> Tensor:
    """One int64 ordering by group, then by the float32 key (its bits made order-preserving as an integer)."""
    bits = key.float().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude sorts first
    return group * (1 << 32) + bits + (1 << 31)


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

    Each unit's intervals start at its on threshold b (`base`; 0 for features): interval j is [b + j*w,
    b + (j+1)*w). It has `n` intervals of width w, a power of two. Its first firing sets w so that n*w covers
    max - b; whenever a larger max appears w doubles and neighbouring intervals merge pairwise: counts add, and
    the bottom-k samples merge exactly. At the end the unit's max - b lies in (n*w/2, n*w], so the top populated
    interval holds the max and between n/2 + 1 and n intervals are populated.
    """

    def __init__(self, n_units: int, n_intervals: int, size: int, window: int, cofire: int,
                 base: Tensor | None = None) -> None:
        self.n_units, self.n, self.size = n_units, n_intervals, size
        self.base = torch.zeros(n_units) if base is None else base.float()
        self.width = torch.zeros(n_units)  # 0 until the unit fires
        self.counts = torch.zeros(n_units * n_intervals, dtype=torch.int64)
        self.samples = Reservoirs(n_units * n_intervals, size, window, cofire, n_units)

    def widen(self, new_max: Tensor) -> None:
        """Make base + n * width cover `new_max` [units], doubling widths (merging interval pairs) as needed."""
        span = new_max - self.base
        fresh = (self.width == 0) & (span > 0)
        if fresh.any():
            self.width[fresh] = torch.exp2(torch.ceil(torch.log2(span[fresh] / self.n)))
        while True:
            grow = ((self.width > 0) & (span > self.width * self.n)).nonzero().squeeze(1)
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
        return ((value - self.base[unit]) / self.width[unit]).floor_().long().clamp_(0, self.n - 1)
