"""The feature store: one SQLite database per SAE holding what the analysis pass found for every SAE feature
and every MLP neuron of its layer, plus what the labeler adds.

It lives beside the SAE's files (where is the run layout's business) rather than one per run, because a run
may train several SAEs and each needs its own store; the SAE folder then is a complete, portable "feature
dictionary". The store takes plain records (`UnitRecord`, `SequenceRecord`) and imports no module that fills
it: `schema` (the on-disk contract), `records` (the dataclasses), `query` (`UnitQuery` for lists),
`reader` (`FeatureStore`) and `writer` (`write_store`).
"""

from features.store.query import ORDER_COLUMNS, UnitQuery
from features.store.reader import ALL_UNITS, FeatureStore, density_note, read_fingerprint
from features.store.records import (
    KINDS,
    STATUSES,
    Example,
    Explanation,
    Interval,
    IntervalRecord,
    Kind,
    LogitRecord,
    Probe,
    Related,
    Semantics,
    SequenceRecord,
    Status,
    StoredExample,
    Tag,
    Unit,
    UnitRecord,
    UnitStats,
    UnitSummary,
    check_kind,
)
from features.store.schema import EXAMPLE_LAYOUT, LABELER_TABLES, SCHEMA_VERSION, STORE_FORMAT, TABLE_DOCS
from features.store.writer import write_store

__all__ = ["ALL_UNITS", "EXAMPLE_LAYOUT", "KINDS", "LABELER_TABLES", "ORDER_COLUMNS", "SCHEMA_VERSION", "STATUSES",
           "STORE_FORMAT", "TABLE_DOCS", "Example", "Explanation", "FeatureStore", "Interval", "IntervalRecord",
           "Kind", "LogitRecord", "Probe", "Related", "Semantics", "SequenceRecord", "Status", "StoredExample", "Tag",
           "Unit", "UnitQuery", "UnitRecord", "UnitStats", "UnitSummary", "check_kind", "density_note",
           "read_fingerprint", "write_store"]
