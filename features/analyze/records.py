"""The pass's tensors as the feature store's plain records: one `UnitRecord` per unit, one `SequenceRecord` per
analysed sequence. Values are rounded to what a page shows, so the store stays small.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from features.analyze.analysis import Analysis, KindResult
from features.store import (
    IntervalRecord,
    LogitRecord,
    Related,
    SequenceRecord,
    Status,
    StoredExample,
    UnitRecord,
    write_store,
)


def write_analysis(path: Path, analysis: Analysis, *, vocab: list[str], meta: dict[str, Any]) -> Path:
    """Write `analysis` as a feature store at `path` (its settings under meta 'analysis', then `meta`)."""
    return write_store(path, unit_records(analysis, vocab), sequences=sequence_records(analysis), vocab=vocab,
                       meta={"analysis": analysis.settings, **meta})


def sequence_records(analysis: Analysis) -> list[SequenceRecord]:
    return [SequenceRecord(split, index, t) for (split, index), t in
            zip(analysis.sources, analysis.tokens.tolist(), strict=True)]


def unit_records(analysis: Analysis, vocab: list[str]) -> Iterator[UnitRecord]:
    """Every unit of every kind, in index order (lazily: the store writes them as they come)."""
    tokens = analysis.tokens.numpy()
    for res in analysis.kinds.values():
        yield from _kind_records(res, analysis.settings, analysis.n_tokens, _Vocab(vocab), tokens)


class _Vocab:
    """Token text by id, with a placeholder for ids the vocabulary lacks."""

    def __init__(self, strings: list[str]) -> None:
        self.strings = strings

    def __call__(self, token_id: int) -> str:
        return self.strings[token_id] if 0 <= token_id < len(self.strings) else f"<{token_id}>"


def _kind_records(res: KindResult, settings: dict[str, Any], n_tokens: int, tok: _Vocab,
                  tokens: np.ndarray) -> Iterator[UnitRecord]:
    before = settings["window_before"]
    n_fires = res.n_fires.numpy()
    mean = (res.sum_act / res.n_fires.clamp_min(1)).numpy()
    max_act = res.max_act.double().numpy()
    hist = res.hist.numpy()
    top = {k: v.numpy() for k, v in res.top.items()}
    iv = {k: v.numpy() for k, v in res.intervals.items()}
    width, counts = res.interval_width.double().numpy(), res.interval_counts.numpy()
    threshold = res.threshold.double().numpy()
    logits = {k: v.numpy() for k, v in res.logits.items()} if res.logits is not None else None
    for i in range(res.n_units):
        n = int(n_fires[i])
        freq = n / max(n_tokens, 1)
        dec = _decimals(float(max_act[i]))
        top_ex = _examples(top["seq"][i], top["pos"][i], top["value"][i], top["window"][i], before, dec)
        logit = _logits(logits, i, tok) if logits is not None else None
        intervals = _intervals({k: v[i] for k, v in iv.items()}, float(threshold[i]), float(width[i]), counts[i],
                               before, dec)
        yield UnitRecord(
            kind=res.kind, index=i, status=_status(n, freq, settings["dense_threshold"]), n_fires=n, freq=freq,
            mean_act=float(mean[i]), max_act=float(max_act[i]), threshold=float(threshold[i]),
            top_tokens=list(dict.fromkeys(tok(int(tokens[e[0], e[1]])) for e in top_ex)),
            pos_tokens=[p[1] for p in logit.pos] if logit is not None else [],
            hist=_hist(hist[i]), top_examples=top_ex, intervals=intervals,
            cofiring=_related(res.cofiring, i), logits=logit, neighbours=_maybe_related(res.neighbours, i),
            correlated=_maybe_related(res.correlated, i), aligned=_maybe_related(res.aligned, i))


def _status(n_fires: int, freq: float, dense_threshold: float) -> Status:
    return "dead" if n_fires == 0 else ("dense" if freq > dense_threshold else "live")


def _decimals(scale: float) -> int:
    """Decimals that keep 3 significant digits of values up to `scale` (a context's shading needs no more)."""
    if not scale > 0 or not math.isfinite(scale):
        return 3
    return int(min(max(2 - math.floor(math.log10(scale)), 0), 8))


def _examples(seq: np.ndarray, pos: np.ndarray, value: np.ndarray, window: np.ndarray, before: int,
              decimals: int) -> list[StoredExample]:
    """Examples from one unit's arrays ([n], [n], [n], [n, w]); empty slots (seq < 0) dropped, each window
    trimmed to the tokens inside its sequence."""
    out = []
    rounded = np.round(window.astype(np.float64), decimals)
    valid = ~np.isnan(rounded)
    values = np.round(value.astype(np.float64), decimals).tolist()
    for i in np.flatnonzero(seq >= 0).tolist():
        cols = np.flatnonzero(valid[i])
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        p = int(pos[i])
        out.append((int(seq[i]), p, values[i], p - before + lo, rounded[i, lo:hi].tolist()))
    return out


def _intervals(iv: dict[str, np.ndarray], base: float, width: float, counts: np.ndarray, before: int,
               decimals: int) -> list[IntervalRecord]:
    """One unit's populated intervals (from its on threshold `base` up) with their share of its firings and their
    examples."""
    total = int(counts.sum())
    return [IntervalRecord(base + j * width, base + (j + 1) * width, int(counts[j]), round(int(counts[j]) / total, 6),
                           _examples(iv["seq"][j], iv["pos"][j], iv["value"][j], iv["window"][j], before, decimals))
            for j in np.flatnonzero(counts).tolist()]


def _hist(counts: np.ndarray) -> tuple[int, list[int]]:
    """(first non-empty bin, counts up to the last non-empty one)."""
    nz = np.flatnonzero(counts)
    return (int(nz[0]), counts[nz[0]:nz[-1] + 1].tolist()) if len(nz) else (0, [])


def _logits(logits: dict[str, np.ndarray], i: int, tok: _Vocab) -> LogitRecord:
    def side(ids: np.ndarray, values: np.ndarray) -> list[tuple[int, str, float]]:
        return [(int(t), tok(int(t)), round(float(v), 4)) for t, v in zip(ids, values, strict=True)]

    return LogitRecord(side(logits["pos_ids"][i], logits["pos_values"][i]),
                       side(logits["neg_ids"][i], logits["neg_values"][i]),
                       (round(float(logits["hist_lo"][i]), 4), round(float(logits["hist_hi"][i]), 4),
                        logits["hist"][i].tolist()))


def _related(pair: tuple[Tensor, Tensor], i: int) -> Related:
    """Unit i's related units as (index, value), values rounded, empty (non-finite or zero) slots dropped."""
    ids, vals = pair[0][i].tolist(), np.round(pair[1][i].double().numpy(), 4).tolist()
    return [(a, b) for a, b in zip(ids, vals, strict=True) if math.isfinite(b) and b != 0]


def _maybe_related(pair: tuple[Tensor, Tensor] | None, i: int) -> Related | None:
    return None if pair is None else _related(pair, i)
