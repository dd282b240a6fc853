"""The store's on-disk contract: the SQL schema, its version, what each table means, and opening a file
only when it is a store of this version (anything else is refused with the command that rebuilds it).

Schema (version `SCHEMA_VERSION`, in `PRAGMA user_version` and `meta.schema_version`):

- `meta(key, value)`: JSON values: format, schema_version, SAE cfg.json, eval metrics, run config, analysis
  settings (hooks, histogram edges, what "firing" and the logit effect mean), fingerprint, sizes.
- `units(kind, idx, status, n_fires, freq, mean_act, max_act, threshold, top_tokens, pos_tokens)`: one slim row
  per unit for lists and filters; `kind` is 'feature' or 'neuron'; status 'live' | 'dead' | 'dense'. Firing
  means "on": above the unit's `threshold` (`meta.analysis.on_rule`, features/analyze/on_rule.py).
- `unit_details(kind, idx, hist, top_examples, intervals, logits, neighbours, cofiring, correlated, aligned)`:
  JSON per unit for its page. An example is `[seq, pos, value, start, [acts]]`: the activations at tokens
  start.. of sequence `seq` (see `sequences`), the example token at `pos`.
- `sequences(seq, split, split_index, tokens)`: the analysed token ids (JSON); `vocab(id, token)`: strings.
- Written by the labeler, created empty by the writer: `tags` (with the causal test's effect, Holm-corrected
  p-value and 95% CI), `semantics`, `probes`, `explanations`.

Version 2 added `units.threshold` (the one "on" rule for features and neurons) and `tags.causal_p`,
`causal_lo`, `causal_hi`. A version-1 store cannot be migrated in place (its neuron statistics were counted with
"> 0"), so it is refused with the command that rebuilds it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from sae.errors import SaekitError

SCHEMA_VERSION = 2
STORE_FORMAT = "saekit-feature-store"
EXAMPLE_LAYOUT = ["seq", "pos", "value", "start", "acts"]
LABELER_TABLES = ("tags", "semantics", "probes", "explanations")
REBUILD = "saekit analyze --config <your config> --overwrite"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE units (
    kind TEXT NOT NULL CHECK (kind IN ('feature', 'neuron')),
    idx INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('live', 'dead', 'dense')),
    n_fires INTEGER NOT NULL,
    freq REAL NOT NULL,
    mean_act REAL NOT NULL,
    max_act REAL NOT NULL,
    threshold REAL NOT NULL,
    top_tokens TEXT NOT NULL,
    pos_tokens TEXT NOT NULL,
    PRIMARY KEY (kind, idx)
);
CREATE TABLE unit_details (
    kind TEXT NOT NULL,
    idx INTEGER NOT NULL,
    hist TEXT NOT NULL,
    top_examples TEXT NOT NULL,
    intervals TEXT NOT NULL,
    logits TEXT,
    neighbours TEXT,
    cofiring TEXT NOT NULL,
    correlated TEXT,
    aligned TEXT,
    PRIMARY KEY (kind, idx)
);
CREATE TABLE sequences (seq INTEGER PRIMARY KEY, split TEXT NOT NULL, split_index INTEGER NOT NULL,
                        tokens TEXT NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, token TEXT NOT NULL);
CREATE TABLE tags (
    kind TEXT NOT NULL CHECK (kind IN ('feature', 'neuron')),
    idx INTEGER NOT NULL,
    entity_type TEXT NOT NULL,
    attribute TEXT NOT NULL,
    value TEXT NOT NULL,
    precision REAL, recall REAL, f1 REAL, auroc REAL,
    support INTEGER,
    entities TEXT NOT NULL DEFAULT '[]',
    causal_effect REAL,
    causal_status TEXT,
    causal_p REAL,
    causal_lo REAL,
    causal_hi REAL
);
CREATE TABLE semantics (
    kind TEXT NOT NULL CHECK (kind IN ('feature', 'neuron')),
    idx INTEGER NOT NULL,
    score REAL,
    class TEXT NOT NULL CHECK (class IN ('monosemantic', 'polysemantic', 'dead')),
    concepts TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (kind, idx)
);
CREATE TABLE probes (
    kind TEXT NOT NULL CHECK (kind IN ('feature', 'neuron')),
    entity_type TEXT NOT NULL,
    attribute TEXT NOT NULL,
    method TEXT NOT NULL,
    accuracy REAL,
    baseline REAL,
    n_train INTEGER,
    n_test INTEGER,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE explanations (
    kind TEXT NOT NULL CHECK (kind IN ('feature', 'neuron')),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    score REAL,
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX units_freq ON units (kind, freq);
CREATE INDEX units_max_act ON units (kind, max_act);
CREATE INDEX units_mean_act ON units (kind, mean_act);
CREATE INDEX units_status ON units (kind, status, freq);
CREATE INDEX tags_unit ON tags (kind, idx);
CREATE INDEX tags_attribute ON tags (entity_type, attribute, value);
CREATE INDEX tags_f1 ON tags (f1);
CREATE INDEX semantics_class ON semantics (class, score);
CREATE INDEX probes_attribute ON probes (entity_type, attribute);
CREATE INDEX explanations_unit ON explanations (kind, idx);
"""


# What each table holds, for people reading the database without saekit (written into bundles' README.json).
TABLE_DOCS = {
    "meta": "key -> JSON value: format, schema_version, sae (cfg.json), eval (eval.json), run_config, analysis "
            "(hooks, hist_edges, window, what firing / logit effect / co-firing mean), fingerprint",
    "units": "one row per unit (kind 'feature' | 'neuron', idx): status live/dead/dense, n_fires, freq, mean_act "
             "(over firing tokens), max_act, threshold (firing = activation > threshold; meta.analysis.on_rule), "
             "top_tokens and pos_tokens (' | '-joined, for search)",
    "unit_details": "JSON per unit: hist [first_bin, counts] over meta.analysis.hist_edges; top_examples and "
                    "intervals[].examples as [seq, pos, value, start, acts] (acts at tokens start.. of "
                    "sequences.seq); logits {pos, neg: [[token_id, token, value]], hist: [min, max, counts]}; "
                    "neighbours / cofiring / correlated / aligned as [[idx, value]]",
    "sequences": "seq -> JSON token ids of each analysed sequence, with its split and index in the split",
    "vocab": "token id -> text",
    "tags": "labeler: unit encodes entity_type.attribute = value, with precision/recall/f1/auroc/support, the "
            "entities (JSON) and a causal check: causal_effect (mean over prompts of the unit's ablation drop minus "
            "matched random units', nats), causal_p (sign-flip test, Holm-corrected over every tag tested), "
            "causal_lo / causal_hi (its 95% bootstrap CI), causal_status",
    "semantics": "labeler: per unit a score and class monosemantic / polysemantic / dead, concepts (JSON)",
    "probes": "labeler: probe accuracy per (kind, entity_type, attribute, method), details (JSON)",
    "explanations": "labeler: text explanations per unit with a score and their source",
}


def connect(path: Path, writable: bool = False) -> sqlite3.Connection:
    """A connection to the store at `path`, refused with one clear message unless it is a saekit feature
    store of exactly this schema version (older: rebuild it; newer: upgrade saekit)."""
    if path.is_dir():
        raise SaekitError(f"{path} is a folder; pass the path of the feature store file inside it")
    if not path.is_file():
        raise SaekitError(f"no feature store at {path}; build it with `saekit analyze --config <your config>`")
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode={'rw' if writable else 'ro'}", uri=True,
                          check_same_thread=False)
    try:
        _check_version(con, path)
    except BaseException:
        con.close()
        raise
    con.execute("PRAGMA busy_timeout = 10000")
    return con


def _check_version(con: sqlite3.Connection, path: Path) -> None:
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        fmt = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise SaekitError(f"{path} is not a saekit feature store ({exc}); rebuild it with `{REBUILD}`") from None
    if fmt is None or json.loads(fmt[0]) != STORE_FORMAT:
        raise SaekitError(f"{path} is an SQLite file but not a saekit feature store (no meta.format "
                          f"'{STORE_FORMAT}'); point to a feature store written by `saekit analyze`")
    if version < SCHEMA_VERSION:
        raise SaekitError(f"{path} has feature-store schema version {version}, older than the version "
                          f"{SCHEMA_VERSION} this saekit reads; rebuild it with `{REBUILD}` (then rerun the labeler)")
    if version > SCHEMA_VERSION:
        raise SaekitError(f"{path} has feature-store schema version {version}, newer than the version "
                          f"{SCHEMA_VERSION} this saekit reads; upgrade saekit to read it")
