"""Writing a feature store from plain records, atomically.

A store is built in a temporary file in one transaction and renamed over the old one, so a killed writer
leaves either no store or the previous one. Rebuilding for the same SAE carries the labeler's tables over.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sae as saekit
from features.store.reader import FeatureStore
from features.store.records import KINDS, Related, SequenceRecord, UnitRecord
from features.store.schema import EXAMPLE_LAYOUT, LABELER_TABLES, SCHEMA, SCHEMA_VERSION, STORE_FORMAT
from sae.errors import SaekitError
from sae.io import atomic_write

_CHUNK = 1024  # units per insert: bounded memory for the JSON of large SAEs
_ZERO = re.compile(r"(?<=[\[,])-?0\.0(?=[,\]])")


def _compact(obj: Any) -> str:
    """JSON without spaces and with 0.0 written as 0: most of a feature's context activations are zero."""
    return _ZERO.sub("0", json.dumps(obj, separators=(",", ":")))


def _related(pairs: Related | None) -> str | None:
    return None if pairs is None else _compact(pairs)


def _unit_rows(r: UnitRecord) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The `units` row and the `unit_details` row of one unit."""
    logits = None if r.logits is None else _compact({"pos": r.logits.pos, "neg": r.logits.neg,
                                                      "hist": list(r.logits.hist)})
    intervals = [{"min": iv.min, "max": iv.max, "count": iv.count, "share": iv.share, "examples": iv.examples}
                 for iv in r.intervals]
    return ((r.kind, r.index, r.status, r.n_fires, r.freq, r.mean_act, r.max_act, r.threshold,
             " | ".join(r.top_tokens), " | ".join(r.pos_tokens)),
            (r.kind, r.index, _compact(r.hist), _compact(r.top_examples), _compact(intervals), logits,
             _related(r.neighbours), _compact(r.cofiring), _related(r.correlated), _related(r.aligned)))


def _insert_units(con: sqlite3.Connection, units: Iterable[UnitRecord]) -> dict[str, int]:
    """Insert every unit, a chunk at a time; returns how many of each kind."""
    counts = dict.fromkeys(KINDS, 0)
    chunk: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []

    def flush() -> None:
        con.executemany("INSERT INTO units VALUES (?,?,?,?,?,?,?,?,?,?)", (r[0] for r in chunk))
        con.executemany("INSERT INTO unit_details VALUES (?,?,?,?,?,?,?,?,?,?)", (r[1] for r in chunk))
        chunk.clear()

    for unit in units:
        counts[unit.kind] += 1
        chunk.append(_unit_rows(unit))
        if len(chunk) == _CHUNK:
            flush()
    flush()
    return counts


def _checkpoint(path: Path) -> None:
    """Fold an existing store's WAL into it, so nothing of it is left beside the file that replaces it."""
    try:
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
    except sqlite3.DatabaseError:
        pass


def _settle_old(path: Path, sae_sha: Any) -> bool:
    """Fold the WAL of an existing store at `path` into it (one left beside the new file would be replayed
    into it), and say whether that store describes the same SAE, so its labeler tables stay valid."""
    if not path.is_file():
        return False
    _checkpoint(path)
    if sae_sha is None:
        return False
    try:
        with FeatureStore.open(path) as old:
            return old.meta.get("sae_sha256") == sae_sha
    except SaekitError:
        return False


def write_store(path: str | Path, units: Iterable[UnitRecord], *, sequences: Sequence[SequenceRecord],
                vocab: list[str], meta: dict[str, Any]) -> Path:
    """Write a store at `path`, atomically: `units` (any order), the analysed `sequences` the examples point
    into (by position), token strings, and metadata (`meta['analysis']` holds the pass's settings and
    `hist_edges`). The labeler's tables of an existing store at `path` are carried over when it describes the
    same SAE (`meta['sae_sha256']`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    carry = _settle_old(path, meta.get("sae_sha256"))
    base = {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "saekit_version": saekit.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "example_layout": EXAMPLE_LAYOUT,
            "n_tokens": sum(len(s.tokens) for s in sequences), "n_sequences": len(sequences)}

    def build(tmp: Path) -> None:
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA journal_mode = OFF")  # the rename is the commit; no journal needed while building
            con.execute("PRAGMA synchronous = OFF")
            con.executescript(SCHEMA)
            with con:
                con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(vocab))
                con.executemany("INSERT INTO sequences VALUES (?, ?, ?, ?)",
                                ((i, s.split, s.index, _compact(s.tokens)) for i, s in enumerate(sequences)))
                counts = _insert_units(con, units)
                full = {**base, **{f"n_{k}s": n for k, n in counts.items()}, **meta}
                con.executemany("INSERT INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in full.items()))
                if carry:
                    con.execute("ATTACH DATABASE ? AS old", (str(path),))
                    for table in LABELER_TABLES:
                        con.execute(f"INSERT INTO main.{table} SELECT * FROM old.{table}")
            if carry:
                con.execute("DETACH DATABASE old")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("PRAGMA journal_mode = WAL")  # readers (viewer) and the labeler's writes coexist
        finally:
            con.close()

    atomic_write(path, build)
    return path
