"""saekit's upper layer: feature analysis, the SQLite feature store, entity-attribute labelling, reports, the
viewer, and the pipeline that wires every stage over one run directory.

Names are exported lazily (importing `features` loads nothing heavy):

    from features import FeatureStore, UnitQuery
    with FeatureStore.open("runs/smollm2_mlp/saes/<sae-id>/features.db") as store:
        store.search(UnitQuery(text="Paris"))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FeatureStore": "features.store", "UnitQuery": "features.store", "Kind": "features.store",
    "Tag": "features.store", "Unit": "features.store",
    "AnalyzeConfig": "features.analyze", "run_analysis": "features.analyze",
    "LabelConfig": "features.labeling", "run_label": "features.labeling", "load_entities": "features.labeling",
    "write_report": "features.report",
    "export_parquet": "features.export", "export_neuronpedia": "features.export", "export_bundle": "features.export",
    "RunLayout": "features.layout", "store_in": "features.layout",
    "RunConfig": "features.run_config", "load_config": "features.run_config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'features' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
