"""Labeling one SAE into its feature store: the entry point the pipeline calls.

The store carries the analysis pass's firing frequencies (the causal controls' match) and receives the tags,
probes and monosemanticity scores; the report is written by the caller from the returned outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from features.analyze import sae_fingerprint
from features.labeling.config import LabelConfig
from features.labeling.directions_run import sae_seeds
from features.labeling.entities import EntitySet, load_entities
from features.labeling.labeler import label
from features.labeling.prompts import encode_text
from features.labeling.results import LabelOutcome, LabelResult
from features.labeling.semantics import score_store, to_store_rows
from features.store import FeatureStore, UnitQuery
from sae.errors import SaekitError
from sae.formats import load_sae

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sae.saes import SAE

REBUILD = "rebuild it with `saekit analyze --config <your config> --overwrite`"


def _check_store(store: FeatureStore, path: Path, sae_dir: Path, sae: SAE) -> None:
    """Refuse a store built for other weights or another width: its tags would describe different units."""
    if store.meta.get("sae_sha256") not in (None, sae_fingerprint(sae_dir)):
        raise SaekitError(f"{path} was built for other weights than the SAE now in {sae_dir} (retrained?); "
                          + REBUILD)
    n_feat = store.n_units("feature")
    if n_feat != sae.shape.d_sae:
        raise SaekitError(f"{path} holds {n_feat} features but the SAE has {sae.shape.d_sae}; " + REBUILD)


def _feature_freq(store: FeatureStore) -> Tensor:
    """Each feature's firing frequency over the analysed text."""
    n = store.n_units("feature")
    freq = torch.zeros(n)
    for u in store.search(UnitQuery(kind="feature", include_dead=True), limit=n):
        freq[u.index] = u.freq
    return freq


def _semantics(store: FeatureStore, entity_sets: list[EntitySet], model: HookedTransformer, result: LabelResult,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Score every unit's monosemanticity into the store; returns the summary for the report."""
    t0 = time.perf_counter()
    tok = model.tokenizer

    def encode(text: str) -> list[int]:
        return encode_text(tok, text)

    rows, summary = score_store(store, entity_sets, encode if tok is not None else None, log=log)
    store.write_semantics(to_store_rows(rows), replace=True)
    result.timings["semantics"] = time.perf_counter() - t0
    result.timings["total"] += result.timings["semantics"]
    return summary


def run_label(model: HookedTransformer, sae_dir: Path, store: Path, cfg: LabelConfig,
              log: Callable[[str], None] = print) -> LabelOutcome:
    """Label the SAE in `sae_dir` with `cfg`: tags, probes and semantics go into the feature store file `store`
    (which the analysis pass must have built). Returns what the report needs; writes no report."""
    sae_dir, store = Path(sae_dir), Path(store)
    if not store.is_file():
        raise SaekitError(f"no feature store for SAE '{sae_dir.name}' ({store} is missing): the labeler writes into "
                          "the analysis pass's store; run `saekit analyze --config <your config>` first")
    sae = load_sae(sae_dir)
    entity_sets = load_entities(cfg)
    with FeatureStore.open(store, writable=True) as fs:
        _check_store(fs, store, sae_dir, sae)
        n_neurons = fs.n_units("neuron")
        result = label(model, sae, entity_sets, cfg, feature_freq=_feature_freq(fs), neurons=n_neurons > 0, log=log)
        if n_neurons == 0:
            result.settings["note"] = "the store has no neurons (analyze.neurons: false); neurons not labeled"
        fs.write_tags(result.tags)
        fs.write_probes(result.probes)
        summary = _semantics(fs, entity_sets, model, result, log) if cfg.semantics else None
        meta = {"sae_id": sae_dir.name, "model_name": model.cfg.model_name, "store": str(store),
                "entity_types": [es.entity_type for es in entity_sets], "eval": fs.meta.get("eval"),
                "seeds": sae_seeds([sae_dir])}
    return LabelOutcome(result, summary, meta)
