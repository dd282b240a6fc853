"""The analysis pass: one streaming pass of model + SAE over a token set gives, for every SAE feature and every
MLP neuron of the same layer, the statistics and examples a feature page shows.

"Firing" is one rule for both kinds (`on_rule`): above the unit's threshold, 0 for features and a quantile
matched to the features' median firing rate for the signed neurons, estimated on the first batches (kept in
memory until then). Each quantity is a running reduction over batches (see `stats`), so memory depends on the
number of units, never on the number of tokens, and no tokens x units matrix outlives its batch:

- firing count, sum, max and a log-spaced histogram: scatter-adds over the batch's entries above threshold;
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

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from features.analyze.config import AnalyzeConfig
from features.analyze.firings import feature_firings, firings_from_dense
from features.analyze.on_rule import CALIBRATION_TOKENS, RULE_TEXT, neuron_thresholds, rule_settings
from features.analyze.sources import Batches, analysed_hooks, model_batches
from features.analyze.stats import HIST_BINS, Correlation, UnitAccumulator, Window, cofiring, hist_edges
from features.analyze.weights import cosine_top, feature_directions, ln_final_weight, logit_effects
from features.store import Kind
from sae.errors import SaekitError
from sae.evaluate import DENSE_THRESHOLD
from sae.hooks import check_fit, hook_layer, neuron_hook
from sae.saes import SAE

COFIRE_WIDTH = 32  # units per token that count as "firing with" one another


@dataclass
class KindResult:
    """One kind's results as tensors, units in index order; `records.store_records` turns them into rows."""

    kind: Kind
    n_units: int
    threshold: Tensor  # [U] the on threshold (`on_rule`): everything below counts tokens where the unit is on
    n_fires: Tensor  # [U] int64
    sum_act: Tensor  # [U] float64, over firing tokens
    max_act: Tensor  # [U]
    hist: Tensor  # [U, HIST_BINS] int64
    top: dict[str, Tensor]  # seq, pos, value, window: [U, k(, w)], value-descending, seq -1 where empty
    interval_width: Tensor  # [U]; interval j is [threshold + j*w, threshold + (j+1)*w)
    interval_counts: Tensor  # [U, n_intervals] int64
    intervals: dict[str, Tensor]  # seq, pos, value, window: [U, n_intervals, m(, w)]
    cofiring: tuple[Tensor, Tensor]  # (ids, share) [U, n]
    correlated: tuple[Tensor, Tensor] | None = None  # (other kind's ids, Pearson r) [U, n]
    neighbours: tuple[Tensor, Tensor] | None = None  # (ids, cosine of output directions) [U, n]
    aligned: tuple[Tensor, Tensor] | None = None  # features: (neuron ids, cosine decoder row vs W_out row)
    logits: dict[str, Tensor] | None = None  # see logit_effects


@dataclass
class Analysis:
    """What one pass found: per kind its results, the analysed sequences and the settings to store with them."""

    kinds: dict[Kind, KindResult]
    tokens: Tensor  # [n_seq, ctx] the analysed sequences
    sources: list[tuple[str, int]]  # (split, index in split) per analysed sequence
    settings: dict[str, Any] = field(default_factory=dict)  # hooks, window, bins, notes: stored as metadata

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


@torch.inference_mode()
def analyze(model: HookedTransformer, sae: SAE, tokens: Tensor, cfg: AnalyzeConfig,
            sources: list[tuple[str, int]] | None = None, batches: Batches | None = None,
            progress: bool = True) -> Analysis:
    """Analyse every feature of `sae` and (cfg.neurons) every neuron of its layer over `tokens` [n_seq, ctx].

    `batches` replaces the model run (e.g. rows read from an activation cache): (first sequence index,
    {hook: activations [batch tokens, d]}) covering `tokens` in order, batch by batch.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    check_fit(model, sae)
    sae = sae.cpu().eval()
    n_seq, ctx = tokens.shape
    if n_seq == 0:
        raise SaekitError("no sequences to analyse; raise analyze.sequences or the corpus size")
    if batches is None:
        batches = model_batches(model, tokens, analysed_hooks(sae, cfg.neurons), cfg.batch_size)
    head, rest, thresholds, rule = _calibrate(sae, batches, cfg.neurons)
    acc, corr = _accumulators(thresholds, cfg, ctx)
    with tqdm(total=tokens.numel(), unit="tok", unit_scale=True, desc="analysing", disable=not progress,
              dynamic_ncols=True) as bar:
        for first, acts in itertools.chain(head, rest):
            _update(sae, acts, first, ctx, acc, corr)
            bar.update(len(acts[sae.provenance.hook_name]))
    timing = {"pass_seconds": time.perf_counter() - t0, "pass_cpu_seconds": time.process_time() - cpu0}
    results = {kind: _finish(a, cfg.n_related) for kind, a in acc.items()}
    if corr is not None:
        results["feature"].correlated, results["neuron"].correlated = corr.top(cfg.n_related)
    _add_weight_results(model, sae, results, cfg)
    timing.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0)
    settings = _settings(model, sae, cfg, list(results), tokens, timing)
    settings["on_rule"] = rule
    return Analysis(results, tokens.cpu(), sources or [("tokens", i) for i in range(n_seq)], settings)


def _calibrate(sae: SAE, batches: Batches, neurons: bool) -> tuple[list[tuple[int, dict[str, Tensor]]], Batches,
                                                                   dict[Kind, Tensor], dict[str, Any]]:
    """The on thresholds (`on_rule`) per kind, from the first CALIBRATION_TOKENS tokens: (those batches, kept in
    memory to be analysed first, the remaining batches, thresholds, the rule's settings for the store)."""
    zeros = torch.zeros(sae.shape.d_sae)
    if not neurons:
        return [], batches, {"feature": zeros}, rule_settings(None, 0)
    it = iter(batches)
    head = list(itertools.islice(it, 1))
    read = sae.provenance.hook_name
    while head and sum(len(a[read]) for _, a in head) < CALIBRATION_TOKENS:
        more = list(itertools.islice(it, 1))
        if not more:
            break
        head += more
    fires = torch.zeros(sae.shape.d_sae, dtype=torch.int64)
    for _, acts in head:
        fires += torch.bincount(feature_firings(sae, acts[read].float(), 1).unit, minlength=sae.shape.d_sae)
    values = torch.cat([acts[neuron_hook(read)].float() for _, acts in head])
    thresholds, rate = neuron_thresholds(fires, values)
    return head, it, {"feature": zeros, "neuron": thresholds}, rule_settings(rate, len(values))


def _accumulators(thresholds: dict[Kind, Tensor], cfg: AnalyzeConfig,
                  ctx: int) -> tuple[dict[Kind, UnitAccumulator], Correlation | None]:
    """Empty running statistics for the features and (with neuron thresholds) the neurons and their correlations."""
    window = Window(cfg.window_before, cfg.window_after, ctx)
    gen = torch.Generator().manual_seed(cfg.seed)
    acc = {kind: UnitAccumulator(kind, t, cfg, window, min(COFIRE_WIDTH, len(t)), gen)
           for kind, t in thresholds.items()}
    if "neuron" not in acc:
        return acc, None
    return acc, Correlation(acc["feature"].n, acc["neuron"].n)


def _update(sae: SAE, acts: dict[str, Tensor], first: int, ctx: int, acc: dict[Kind, UnitAccumulator],
            corr: Correlation | None) -> None:
    """Feed one batch (sequences from `first` on) to the running statistics."""
    feats = feature_firings(sae, acts[sae.provenance.hook_name].float(), acc["feature"].cofire)
    if feats.n_tokens % ctx:
        raise SaekitError(f"a batch of {feats.n_tokens} activations is not whole sequences of {ctx} tokens")
    acc["feature"].update(feats, first)
    if corr is not None:
        neurons = firings_from_dense(acts[neuron_hook(sae.provenance.hook_name)], acc["neuron"].cofire,
                                     acc["neuron"].threshold)
        acc["neuron"].update(neurons, first)
        corr.update(feats, neurons.dense)


def _add_weight_results(model: HookedTransformer, sae: SAE, results: dict[Kind, KindResult],
                        cfg: AnalyzeConfig) -> None:
    """Fill in what depends on weights only: logit effects, neighbours and (with neurons) alignment."""
    f_dirs = feature_directions(model, sae)
    W_out = model.blocks[hook_layer(sae.provenance.hook_name)].mlp.W_out.detach().float().cpu()
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


def _settings(model: HookedTransformer, sae: SAE, cfg: AnalyzeConfig, kinds: list[Kind], tokens: Tensor,
              timing: dict[str, float]) -> dict[str, Any]:
    """What the store records about the pass: hooks, sizes, histogram edges and what each quantity means."""
    _, ln_note = ln_final_weight(model)
    prov = sae.provenance
    return {
        "sae_hook": prov.hook_name, "sae_hook_out": prov.hook_name_out, "neuron_hook": neuron_hook(prov.hook_name),
        "kinds": kinds, "n_tokens": tokens.numel(), "n_sequences": tokens.shape[0], "context_size": tokens.shape[1],
        "window_before": cfg.window_before, "window_after": cfg.window_after, "hist_edges": hist_edges(),
        "firing": RULE_TEXT,
        "dense_threshold": DENSE_THRESHOLD,
        "logit_effect": f"(direction * ln_final.w) @ W_U, {ln_note}; direction = decoder row (through W_out for an "
                        "mlp.hook_post SAE) for features, W_out row for neurons; b_U and the norm's scale left "
                        "out; the logit histogram covers a fixed random sample of 8192 vocabulary tokens",
        "neighbours": "cosine of output directions (decoder rows / W_out rows)",
        "cofiring": "share of the unit's firings (interval samples, weighted by interval counts) at which the "
                    f"other unit is among the {COFIRE_WIDTH} most active units of its kind at that token",
        "correlated": "Pearson correlation over all analysed tokens of feature activations and signed neuron "
                      "activations",
        "aligned": "cosine between a feature's decoder direction and a neuron's W_out row, ranked by |cosine|",
        "analyze_config": asdict(cfg), **{k: round(v, 2) for k, v in timing.items()},
    }


def _finish(a: UnitAccumulator, n_related: int) -> KindResult:
    """The accumulator's tables sorted by value (interval samples too) and its co-firing, as a result."""
    top = a.top.sorted()
    intervals = a.intervals.samples.sorted()  # per interval in key (random) order; re-sorted by value below
    m = a.intervals.size
    shaped = {k: v.view(a.n, a.intervals.n, m, *v.shape[2:]) for k, v in intervals.items() if k != "cofire"}
    by_value = torch.where(shaped["seq"] >= 0, -shaped["value"], math.inf).argsort(dim=2, stable=True)
    shaped = {k: v.gather(2, by_value.view(*by_value.shape, *([1] * (v.dim() - 3))).expand_as(v))
              for k, v in shaped.items()}
    return KindResult(
        kind=a.kind, n_units=a.n, threshold=a.threshold, n_fires=a.count, sum_act=a.sum, max_act=a.max,
        hist=a.hist.view(a.n, HIST_BINS), top={k: v for k, v in top.items() if k != "key"},
        interval_width=a.intervals.width, interval_counts=a.intervals.counts.view(a.n, a.intervals.n),
        intervals={k: v for k, v in shaped.items() if k != "key"}, cofiring=cofiring(a.intervals, n_related))
