"""Feature analysis: one streaming pass of model + SAE over a token set gives, for every SAE feature and every
MLP neuron of the same layer, the statistics and examples a feature page shows, written to a feature store.

`config` (AnalyzeConfig), `on_rule` (when a unit is "on": one rule for features and neurons), `firings` /
`reservoirs` / `stats` (the running per-unit statistics), `weights` (what depends on weights only), `analysis`
(the pass, `analyze`), `sources` (which tokens; model or cache activations), `records` (results as the store's
records) and `run` (`run_analysis`, the stage's entry point).
"""

from features.analyze.analysis import Analysis, KindResult, analyze
from features.analyze.config import AnalyzeConfig
from features.analyze.firings import Firings, feature_firings, firings_from_dense, windows
from features.analyze.records import sequence_records, unit_records, write_analysis
from features.analyze.reservoirs import IntervalSampler, Reservoirs
from features.analyze.run import input_fingerprint, run_analysis, sae_fingerprint, vocab_strings
from features.analyze.sources import Batches, analysed_hooks, cache_batches, model_batches, select_tokens
from features.analyze.stats import HIST_BINS, Correlation, UnitAccumulator, Window, cofiring, hist_edges
from features.analyze.weights import LOGIT_HIST_BINS, cosine_top, feature_directions, ln_final_weight, logit_effects

__all__ = ["HIST_BINS", "LOGIT_HIST_BINS", "Analysis", "AnalyzeConfig", "Batches", "Correlation", "Firings",
           "IntervalSampler", "KindResult", "Reservoirs", "UnitAccumulator", "Window", "analysed_hooks", "analyze",
           "cache_batches", "cofiring", "cosine_top", "feature_directions", "feature_firings", "firings_from_dense",
           "hist_edges", "input_fingerprint", "ln_final_weight", "logit_effects", "model_batches", "run_analysis",
           "sae_fingerprint", "select_tokens", "sequence_records", "unit_records", "vocab_strings", "windows",
           "write_analysis"]
