"""The feature store: one SQLite database per SAE (`runs/<name>/saes/<sae-id>/features.db`) holding what the
analysis pass found for every SAE feature and every MLP neuron of its layer, plus what the labeler adds.

It lives in the SAE's folder rather than at `runs/<name>/features.db` because a run may train several SAEs
and each needs its own store; the folder then is a complete, portable "feature dictionary".

Schema (version `SCHEMA_VERSION`, in `PRAGMA user_version` and `meta.schema_version`):

- `meta(key, value)`: JSON values: format, schema_version, SAE cfg.json, eval metrics, run config, analysis
  settings (hooks, histogram edges, what "firing" and the logit effect mean), fingerprint, sizes.
- `units(kind, idx, status, n_fires, freq, mean_act, max_act, top_tokens, pos_tokens)`: one slim row per
  unit for lists and filters; `kind` is 'feature' or 'neuron'; status 'live' | 'dead' | 'dense'.
- `unit_details(kind, idx, hist, top_examples, intervals, logits, neighbours, cofiring, correlated, aligned)`:
  JSON per unit for its page. An example is `[seq, pos, value, start, [acts]]`: the activations at tokens
  start.. of sequence `seq` (see `sequences`), the example token at `pos`.
- `sequences(seq, split, split_index, tokens)`: the analysed token ids (JSON); `vocab(id, token)`: strings.
- Written by the labeler, created empty here: `tags`, `semantics`, `probes`, `explanations`.

A store is built in a temporary file in one transaction and renamed over the old one, so a killed pass leaves
either no store or the previous one. Rebuilding for the same SAE carries the labeler's tables over.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import sae as saekit
from sae.errors import SaekitError
from sae.io import atomic_write

if TYPE_CHECKING:
    from features.analyze import Analysis, KindResult

SCHEMA_VERSION = 1
STORE_FORMAT = "saekit-feature-store"
STORE_FILE = "features.db"
KINDS = ("feature", "neuron")
EXAMPLE_LAYOUT = ["seq", "pos", "value", "start", "acts"]
LABELER_TABLES = ("tags", "semantics", "probes", "explanations")
ORDER_COLUMNS = {"idx": "u.idx", "freq": "u.freq", "max_act": "u.max_act", "mean_act": "u.mean_act",
                 "n_fires": "u.n_fires", "semantic_score": "s.score",
                 "f1": "(SELECT MAX(t.f1) FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx)"}

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
    causal_status TEXT
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
             "(over firing tokens), max_act, top_tokens and pos_tokens (' | '-joined, for search)",
    "unit_details": "JSON per unit: hist [first_bin, counts] over meta.analysis.hist_edges; top_examples and "
                    "intervals[].examples as [seq, pos, value, start, acts] (acts at tokens start.. of "
                    "sequences.seq); logits {pos, neg: [[token_id, token, value]], hist: [min, max, counts]}; "
                    "neighbours / cofiring / correlated / aligned as [[idx, value]]",
    "sequences": "seq -> JSON token ids of each analysed sequence, with its split and index in the split",
    "vocab": "token id -> text",
    "tags": "labeler: unit encodes entity_type.attribute = value, with precision/recall/f1/auroc/support, the "
            "entities (JSON) and a causal check",
    "semantics": "labeler: per unit a score and class monosemantic / polysemantic / dead, concepts (JSON)",
    "probes": "labeler: probe accuracy per (kind, entity_type, attribute, method), details (JSON)",
    "explanations": "labeler: text explanations per unit with a score and their source",
}

def store_path(sae_dir: str | Path) -> Path:
    """Where the store of the SAE in `sae_dir` lives."""
    return Path(sae_dir) / STORE_FILE


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Example:
    """A context: `tokens` around the example token `tokens[focus]`, each with the unit's activation."""

    seq: int
    pos: int
    value: float
    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    focus: int


@dataclass(frozen=True)
class Interval:
    """Activation interval [min, max) with its count, its share of all firings, and uniform examples."""

    min: float
    max: float
    count: int
    share: float
    examples: list[Example]


@dataclass(frozen=True)
class Tag:
    """The labeler's finding that a unit encodes entity_type.attribute = value (written to `tags`)."""

    kind: str
    index: int
    entity_type: str
    attribute: str
    value: str
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    auroc: float | None = None
    support: int | None = None
    entities: list[str] = field(default_factory=list)
    causal_effect: float | None = None
    causal_status: str | None = None


@dataclass(frozen=True)
class Semantics:
    """A unit's mono/polysemanticity: `cls` is 'monosemantic', 'polysemantic' or 'dead' (column `class`)."""

    kind: str
    index: int
    score: float | None
    cls: str
    concepts: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Probe:
    """A probe for an attribute read from one kind of unit (e.g. logistic regression on feature activations)."""

    kind: str
    entity_type: str
    attribute: str
    method: str
    accuracy: float | None = None
    baseline: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    kind: str
    index: int
    text: str
    score: float | None = None
    source: str = ""


@dataclass(frozen=True)
class UnitSummary:
    """One row of a list: statistics, search text, best explanation and semantic class if the labeler set them."""

    kind: str
    index: int
    status: str
    n_fires: int
    freq: float
    mean_act: float
    max_act: float
    top_tokens: list[str]
    pos_tokens: list[str]
    explanation: str | None
    semantic_class: str | None
    semantic_score: float | None


@dataclass(frozen=True)
class Unit(UnitSummary):
    """Everything on a unit's page. Related units are (index, value) pairs; `correlated` are of the other kind."""

    hist_edges: list[float] = field(default_factory=list)  # bins [edges[i], edges[i+1])
    hist_counts: list[int] = field(default_factory=list)
    top_examples: list[Example] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    pos_logits: list[tuple[str, float]] = field(default_factory=list)
    neg_logits: list[tuple[str, float]] = field(default_factory=list)
    logit_hist: tuple[float, float, list[int]] | None = None  # (min, max, counts in equal-width bins)
    neighbours: list[tuple[int, float]] = field(default_factory=list)  # cosine of output directions
    cofiring: list[tuple[int, float]] = field(default_factory=list)  # share of this unit's firings
    correlated: list[tuple[int, float]] = field(default_factory=list)  # Pearson r with the other kind
    aligned: list[tuple[int, float]] = field(default_factory=list)  # features: neurons by cosine with W_out
    tags: list[Tag] = field(default_factory=list)
    semantics: Semantics | None = None
    explanations: list[Explanation] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


_SUMMARY_SQL = """SELECT u.kind, u.idx, u.status, u.n_fires, u.freq, u.mean_act, u.max_act, u.top_tokens,
    u.pos_tokens,
    (SELECT e.text FROM explanations e WHERE e.kind = u.kind AND e.idx = u.idx ORDER BY e.score DESC LIMIT 1),
    s.class, s.score
FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx"""


def _split(text: str) -> list[str]:
    return text.split(" | ") if text else []


def _summary(row: Sequence[Any]) -> UnitSummary:
    return UnitSummary(row[0], row[1], row[2], row[3], row[4], row[5], row[6], _split(row[7]), _split(row[8]),
                       row[9], row[10], row[11])


def _pairs(text: str | None) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in json.loads(text)] if text else []


def density_note(counts: dict[str, int]) -> str:
    """Why a kind's counts read "all dense", or "": gated MLP neurons are > 0 on a large share of tokens, so
    "fires" (activation > 0) says little about them; their monosemanticity is the comparison that does."""
    if counts.get("total") and counts.get("dense") == counts["total"]:
        return ("all count as dense: gated MLP neurons are > 0 on a large share of tokens, so judge them by "
                "monosemanticity")
    return ""


class FeatureStore:
    """Typed queries over one features.db. Open with `FeatureStore.open(path)` (read-only unless writable)."""

    def __init__(self, con: sqlite3.Connection, path: Path) -> None:
        self.con, self.path = con, path
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        self._vocab: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> FeatureStore:
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILE
        if not path.is_file():
            raise SaekitError(f"no feature store at {path}; build it with `saekit analyze --config <your config>`")
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode={'rw' if writable else 'ro'}", uri=True,
                              check_same_thread=False)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            fmt = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            con.close()
            raise SaekitError(f"{path} is not a saekit feature store ({exc}); rebuild it with `saekit analyze "
                              "--config <your config> --overwrite`") from None
        if fmt is None or json.loads(fmt[0]) != STORE_FORMAT:
            con.close()
            raise SaekitError(f"{path} is an SQLite file but not a saekit feature store (no meta.format "
                              f"'{STORE_FORMAT}'); point to a features.db written by `saekit analyze`")
        if version != SCHEMA_VERSION:
            con.close()
            if version < SCHEMA_VERSION:
                raise SaekitError(f"{path} has feature-store schema version {version}, older than the version "
                                  f"{SCHEMA_VERSION} this saekit reads; rebuild it with `saekit analyze --config "
                                  "<your config> --overwrite` (then rerun the labeler)")
            raise SaekitError(f"{path} has feature-store schema version {version}, newer than the version "
                              f"{SCHEMA_VERSION} this saekit reads; upgrade saekit to read it")
        con.execute("PRAGMA busy_timeout = 10000")
        return cls(con, path)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- units ---------------------------------------------------------------------------------------

    def n_units(self, kind: str = "feature") -> int:
        return int(self.meta.get(f"n_{self._kind(kind)}s", 0))

    def _kind(self, kind: str) -> str:
        if kind not in KINDS:
            raise SaekitError(f"unknown unit kind '{kind}'; use 'feature' or 'neuron'")
        return kind

    def _check_index(self, kind: str, index: int) -> None:
        n = self.n_units(kind)
        if n == 0:
            raise SaekitError(f"this store has no {kind}s (the analysis ran with analyze.neurons: false)")
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < n:
            raise SaekitError(f"{kind} index {index!r} is out of range: this store has {kind}s 0..{n - 1}")

    @property
    def vocab(self) -> list[str]:
        """Token strings by id (loaded once)."""
        if self._vocab is None:
            rows = self.con.execute("SELECT id, token FROM vocab ORDER BY id").fetchall()
            self._vocab = [""] * (rows[-1][0] + 1 if rows else 0)
            for i, tok in rows:
                self._vocab[i] = tok
        return self._vocab

    def _token(self, token_id: int) -> str:
        vocab = self.vocab
        return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"

    def sequence(self, seq: int) -> list[int]:
        """Token ids of analysed sequence `seq`."""
        row = self.con.execute("SELECT tokens FROM sequences WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise SaekitError(f"sequence {seq} is not in this store (it holds {self.meta.get('n_sequences')})")
        return json.loads(row[0])

    def feature(self, index: int) -> Unit:
        return self.unit("feature", index)

    def neuron(self, index: int) -> Unit:
        return self.unit("neuron", index)

    _DETAIL_SQL = ("SELECT hist, top_examples, intervals, logits, neighbours, cofiring, correlated, aligned "
                   "FROM unit_details")

    def unit(self, kind: str, index: int) -> Unit:
        """Everything about one unit: one row from each of units and unit_details, the sequences its examples
        come from, and the labeler's rows for it."""
        self._check_index(self._kind(kind), index)
        index = int(index)
        row = self.con.execute(_SUMMARY_SQL + " WHERE u.kind = ? AND u.idx = ?", (kind, index)).fetchone()
        det = self.con.execute(self._DETAIL_SQL + " WHERE kind = ? AND idx = ?", (kind, index)).fetchone()
        seqs = sorted({e[0] for e in json.loads(det[1])} |
                      {e[0] for iv in json.loads(det[2]) for e in iv["examples"]})
        marks = ",".join("?" * len(seqs))
        tokens = {s: json.loads(t) for s, t in
                  self.con.execute(f"SELECT seq, tokens FROM sequences WHERE seq IN ({marks})", seqs)}
        return self._build(row, det, tokens, self.tags_for(kind, index), self.semantics_for(kind, index),
                           self.explanations_for(kind, index))

    def iter_units(self, kind: str = "feature") -> Iterator[Unit]:
        """Every unit of a kind in index order, reading each table once (for exports)."""
        kind = self._kind(kind)
        tokens = {s: json.loads(t) for s, t in self.con.execute("SELECT seq, tokens FROM sequences")}
        tags: dict[int, list[Tag]] = {}
        for t in self.find_tags(kind=kind, limit=None):
            tags.setdefault(t.index, []).append(t)
        sem = {s.index: s for s in self.semantics(kind)}
        expl: dict[int, list[Explanation]] = {}
        for r in self.con.execute("SELECT * FROM explanations WHERE kind = ? ORDER BY score DESC NULLS LAST",
                                  (kind,)):
            expl.setdefault(r[1], []).append(Explanation(*r))
        rows = self.con.execute(_SUMMARY_SQL + " WHERE u.kind = ? ORDER BY u.idx", (kind,))
        details = self.con.execute(self._DETAIL_SQL + " WHERE kind = ? ORDER BY idx", (kind,))
        for row, det in zip(rows, details, strict=True):
            yield self._build(row, det, tokens, tags.get(row[1], []), sem.get(row[1]), expl.get(row[1], []))

    def _build(self, row: Sequence[Any], det: Sequence[Any], tokens: dict[int, list[int]], tags: list[Tag],
               semantics: Semantics | None, explanations: list[Explanation]) -> Unit:
        def example(e: list[Any]) -> Example:
            seq, pos, value, start, acts = e
            ids = tokens[seq][start:start + len(acts)]
            return Example(seq, pos, value, [self._token(i) for i in ids], ids, acts, pos - start)

        first, counts = json.loads(det[0])
        edges = self.meta["analysis"]["hist_edges"]
        logits = json.loads(det[3]) if det[3] else None
        return Unit(
            **vars(_summary(row)),
            hist_edges=edges[first:first + len(counts) + 1], hist_counts=counts,
            top_examples=[example(e) for e in json.loads(det[1])],
            intervals=[Interval(iv["min"], iv["max"], iv["count"], iv["share"], [example(e) for e in iv["examples"]])
                       for iv in json.loads(det[2])],
            pos_logits=[(s, v) for _, s, v in logits["pos"]] if logits else [],
            neg_logits=[(s, v) for _, s, v in logits["neg"]] if logits else [],
            logit_hist=(logits["hist"][0], logits["hist"][1], logits["hist"][2]) if logits else None,
            neighbours=_pairs(det[4]), cofiring=_pairs(det[5]), correlated=_pairs(det[6]), aligned=_pairs(det[7]),
            tags=tags, semantics=semantics, explanations=explanations)

    def _where(self, query: str, kind: str, status: str | None, min_freq: float | None, max_freq: float | None,
               min_max_act: float | None, semantic_class: str | None, tagged: bool | None,
               include_dead: bool, tag: Sequence[str | None] | None = None) -> tuple[str, list[Any]]:
        clauses, args = ["u.kind = ?"], [self._kind(kind)]
        if status is not None:
            if status not in ("live", "dead", "dense"):
                raise SaekitError(f"unknown status '{status}'; use 'live', 'dead' or 'dense'")
            clauses.append("u.status = ?")
            args.append(status)
        elif not include_dead:
            clauses.append("u.status != 'dead'")
        for col, op, value in (("u.freq", ">=", min_freq), ("u.freq", "<=", max_freq),
                               ("u.max_act", ">=", min_max_act)):
            if value is not None:
                clauses.append(f"{col} {op} ?")
                args.append(float(value))
        if semantic_class is not None:
            clauses.append("s.class = ?")
            args.append(semantic_class)
        if tagged is not None:
            clauses.append(("" if tagged else "NOT ") + "EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND "
                           "t.idx = u.idx)")
        if tag is not None and any(v is not None for v in tag):  # (entity_type, attribute, value); None: any
            parts = []
            for col, v in zip(("entity_type", "attribute", "value"), tag, strict=True):
                if v is not None:
                    parts.append(f" AND t.{col} = ?")
                    args.append(v)
            clauses.append("EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx" + "".join(parts)
                           + ")")
        query = query.strip()
        if query:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            text = ("u.top_tokens LIKE ?1 ESCAPE '\\' OR u.pos_tokens LIKE ?1 ESCAPE '\\' OR EXISTS (SELECT 1 FROM "
                    "explanations e WHERE e.kind = u.kind AND e.idx = u.idx AND e.text LIKE ?1 ESCAPE '\\') OR "
                    "EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx AND (t.attribute LIKE ?1 "
                    "ESCAPE '\\' OR t.value LIKE ?1 ESCAPE '\\' OR t.entity_type LIKE ?1 ESCAPE '\\'))")
            n = len(args) + 1
            text = text.replace("?1", f"?{n}")
            args.append(like)
            if query.isdigit():
                text = f"u.idx = ?{n + 1} OR " + text
                args.append(int(query))
            clauses.append(f"({text})")
        return " WHERE " + " AND ".join(clauses), args

    def search(self, query: str = "", kind: str = "feature", limit: int = 50, offset: int = 0, *,
               status: str | None = None, min_freq: float | None = None, max_freq: float | None = None,
               min_max_act: float | None = None, semantic_class: str | None = None, tagged: bool | None = None,
               include_dead: bool = True, order_by: str = "idx", descending: bool = False,
               tag: Sequence[str | None] | None = None) -> list[UnitSummary]:
        """Units whose top tokens, top logit tokens, explanations or tags contain `query` (or whose index it is),
        filtered and ordered (order_by: idx, freq, max_act, mean_act, n_fires, semantic_score, f1). `tag`:
        (entity_type, attribute, value), each None for any: only units with such a tag."""
        if order_by not in ORDER_COLUMNS:
            raise SaekitError(f"cannot order by '{order_by}'; choose one of {', '.join(ORDER_COLUMNS)}")
        where, args = self._where(query, kind, status, min_freq, max_freq, min_max_act, semantic_class, tagged,
                                  include_dead, tag)
        direction = "DESC" if descending else "ASC"
        sql = (f"{_SUMMARY_SQL}{where} ORDER BY {ORDER_COLUMNS[order_by]} {direction} NULLS LAST, u.idx "
               f"LIMIT ? OFFSET ?")
        return [_summary(r) for r in self.con.execute(sql, (*args, int(limit), int(offset)))]

    def count(self, query: str = "", kind: str = "feature", *, status: str | None = None,
              min_freq: float | None = None, max_freq: float | None = None, min_max_act: float | None = None,
              semantic_class: str | None = None, tagged: bool | None = None, include_dead: bool = True,
              tag: Sequence[str | None] | None = None) -> int:
        """How many units `search` with the same arguments would page through."""
        where, args = self._where(query, kind, status, min_freq, max_freq, min_max_act, semantic_class, tagged,
                                  include_dead, tag)
        sql = f"SELECT COUNT(*) FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx{where}"
        return int(self.con.execute(sql, args).fetchone()[0])

    def top(self, by: str = "max_act", kind: str = "feature", limit: int = 20, offset: int = 0,
            descending: bool = True, include_dead: bool = False) -> list[UnitSummary]:
        """The units ranked by one statistic (dead units left out unless asked for)."""
        return self.search("", kind, limit, offset, include_dead=include_dead, order_by=by, descending=descending)

    def summary(self) -> dict[str, Any]:
        """Live/dead/dense counts per kind, tokens analysed, the SAE's eval metrics and config, the run config."""
        counts: dict[str, dict[str, int]] = {k: {"total": self.n_units(k), "live": 0, "dead": 0, "dense": 0}
                                             for k in KINDS if self.n_units(k)}
        for kind, status, n in self.con.execute("SELECT kind, status, COUNT(*) FROM units GROUP BY kind, status"):
            counts[kind][status] = n
        m = self.meta
        return {"units": counts, "n_tokens": m.get("n_tokens"), "n_sequences": m.get("n_sequences"),
                "sae_id": m.get("sae_id"), "model_name": m.get("model_name"), "hook": m["analysis"]["sae_hook"],
                "eval": m.get("eval"), "sae": m.get("sae"), "config": m.get("run_config"),
                "created": m.get("created")}

    # -- bulk queries for the viewer (app_streamlit.py) ------------------------------------------------

    def unit_table(self, kind: str = "feature") -> dict[str, list[Any]]:
        """Every unit of a kind as columns (idx, status, n_fires, freq, mean_act, max_act, top_tokens, semantic
        class and score, tag count, best tag f1), in index order: one query for plots and table exports."""
        cols = ["idx", "status", "n_fires", "freq", "mean_act", "max_act", "top_tokens", "semantic_class",
                "semantic_score", "n_tags", "best_f1"]
        rows = self.con.execute(
            "SELECT u.idx, u.status, u.n_fires, u.freq, u.mean_act, u.max_act, u.top_tokens, s.class, s.score, "
            "t.n, t.f1 FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx "
            "LEFT JOIN (SELECT idx, COUNT(*) AS n, MAX(f1) AS f1 FROM tags WHERE kind = ?1 GROUP BY idx) t "
            "ON t.idx = u.idx WHERE u.kind = ?1 ORDER BY u.idx", (self._kind(kind),)).fetchall()
        out = {c: list(v) for c, v in zip(cols, zip(*rows, strict=True), strict=True)} if rows else \
            {c: [] for c in cols}
        out["n_tags"] = [n or 0 for n in out["n_tags"]]
        return out

    def summaries(self, kind: str, indices: Iterable[int]) -> dict[int, UnitSummary]:
        """List rows of the given units (unknown indices left out), e.g. to label links to related units."""
        ids = sorted({int(i) for i in indices})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.con.execute(f"{_SUMMARY_SQL} WHERE u.kind = ? AND u.idx IN ({marks})", (self._kind(kind), *ids))
        return {r[1]: _summary(r) for r in rows}

    def tag_values(self, kind: str | None = None) -> list[tuple[str, str, str, int]]:
        """Distinct (entity_type, attribute, value, units tagged) in the tags table, for filter menus."""
        sql = ("SELECT entity_type, attribute, value, COUNT(DISTINCT kind || idx) FROM tags WHERE (?1 IS NULL OR "
               "kind = ?1) GROUP BY entity_type, attribute, value ORDER BY entity_type, attribute, value")
        return [(a, b, c, int(n)) for a, b, c, n in self.con.execute(sql, (kind,))]

    def set_meta(self, items: dict[str, Any]) -> None:
        """Add or replace metadata entries (JSON values), e.g. refreshed eval metrics or a labeler's settings."""
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in items.items()), None)
        self.meta.update(items)

    # -- labeler tables ------------------------------------------------------------------------------

    def _write(self, sql: str, rows: Iterable[Sequence[Any]], clear: str | None) -> int:
        rows = list(rows)
        try:
            with self.con:
                if clear:
                    self.con.execute(clear)
                self.con.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise SaekitError(f"cannot write to {self.path} ({exc}); open it with FeatureStore.open(path, "
                              "writable=True)") from None
        except sqlite3.IntegrityError as exc:
            raise SaekitError(f"rejected by {self.path}: {exc} (kinds are 'feature'/'neuron', semantic classes "
                              "monosemantic/polysemantic/dead)") from None
        return len(rows)

    def _check_rows(self, rows: Sequence[Tag | Semantics | Explanation]) -> None:
        for r in rows:
            self._check_index(self._kind(r.kind), r.index)

    def write_tags(self, tags: Iterable[Tag], replace: bool = True) -> int:
        """Store the labeler's tags (replace: drop every existing tag first). Returns how many were written."""
        tags = list(tags)
        self._check_rows(tags)
        return self._write("INSERT INTO tags VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           ((t.kind, int(t.index), t.entity_type, t.attribute, t.value, t.precision, t.recall, t.f1,
                             t.auroc, t.support, json.dumps(list(t.entities)), t.causal_effect, t.causal_status)
                            for t in tags), "DELETE FROM tags" if replace else None)

    def tags_for(self, kind: str, index: int) -> list[Tag]:
        return self.find_tags(kind=kind, index=index, limit=None)

    def find_tags(self, entity_type: str | None = None, attribute: str | None = None, value: str | None = None,
                  kind: str | None = None, index: int | None = None, min_f1: float | None = None,
                  limit: int | None = 100) -> list[Tag]:
        """Tags matching every given field, best f1 first."""
        clauses, args = [], []
        for col, v in (("entity_type", entity_type), ("attribute", attribute), ("value", value), ("kind", kind),
                       ("idx", index)):
            if v is not None:
                clauses.append(f"{col} = ?")
                args.append(v)
        if min_f1 is not None:
            clauses.append("f1 >= ?")
            args.append(min_f1)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT * FROM tags{where} ORDER BY f1 DESC NULLS LAST, kind, idx LIMIT ?"
        return [Tag(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], json.loads(r[10]), r[11], r[12])
                for r in self.con.execute(sql, (*args, -1 if limit is None else int(limit)))]

    def write_semantics(self, rows: Iterable[Semantics], replace: bool = False) -> int:
        """Store mono/polysemanticity per unit (a unit's row is replaced; replace: drop all rows first)."""
        rows = list(rows)
        self._check_rows(rows)
        return self._write("INSERT OR REPLACE INTO semantics VALUES (?,?,?,?,?)",
                           ((r.kind, int(r.index), r.score, r.cls, json.dumps(r.concepts)) for r in rows),
                           "DELETE FROM semantics" if replace else None)

    def semantics_for(self, kind: str, index: int) -> Semantics | None:
        row = self.con.execute("SELECT * FROM semantics WHERE kind = ? AND idx = ?", (kind, index)).fetchone()
        return Semantics(row[0], row[1], row[2], row[3], json.loads(row[4])) if row else None

    def semantics(self, kind: str = "feature", cls: str | None = None) -> list[Semantics]:
        sql, args = "SELECT * FROM semantics WHERE kind = ?", [self._kind(kind)]
        if cls is not None:
            sql += " AND class = ?"
            args.append(cls)
        return [Semantics(r[0], r[1], r[2], r[3], json.loads(r[4]))
                for r in self.con.execute(sql + " ORDER BY idx", args)]

    def write_probes(self, rows: Iterable[Probe], replace: bool = True) -> int:
        rows = list(rows)
        for r in rows:
            self._kind(r.kind)
        return self._write("INSERT INTO probes VALUES (?,?,?,?,?,?,?,?,?)",
                           ((r.kind, r.entity_type, r.attribute, r.method, r.accuracy, r.baseline, r.n_train,
                             r.n_test, json.dumps(r.details)) for r in rows), "DELETE FROM probes" if replace else None)

    def probes(self, entity_type: str | None = None, attribute: str | None = None) -> list[Probe]:
        sql = "SELECT * FROM probes WHERE (?1 IS NULL OR entity_type = ?1) AND (?2 IS NULL OR attribute = ?2)"
        return [Probe(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]))
                for r in self.con.execute(sql + " ORDER BY entity_type, attribute, method", (entity_type, attribute))]

    def write_explanations(self, rows: Iterable[Explanation], replace: bool = True) -> int:
        rows = list(rows)
        self._check_rows(rows)
        return self._write("INSERT INTO explanations VALUES (?,?,?,?,?)",
                           ((r.kind, int(r.index), r.text, r.score, r.source) for r in rows),
                           "DELETE FROM explanations" if replace else None)

    def explanations_for(self, kind: str, index: int) -> list[Explanation]:
        return [Explanation(*r) for r in self.con.execute(
            "SELECT * FROM explanations WHERE kind = ? AND idx = ? ORDER BY score DESC NULLS LAST", (kind, index))]


def read_fingerprint(path: Path) -> str | None:
    """The input fingerprint of an existing store of the current schema, else None (absent, damaged, old)."""
    try:
        with FeatureStore.open(path) as store:
            return store.meta.get("fingerprint")
    except SaekitError:
        return None


# ---------------------------------------------------------------------------------------------
# Writing


def _status(n_fires: int, freq: float, dense_threshold: float) -> str:
    return "dead" if n_fires == 0 else ("dense" if freq > dense_threshold else "live")


def _decimals(scale: float) -> int:
    """Decimals that keep 3 significant digits of values up to `scale` (a context's shading needs no more)."""
    if not scale > 0 or not math.isfinite(scale):
        return 3
    return int(min(max(2 - math.floor(math.log10(scale)), 0), 8))


_ZERO = re.compile(r"(?<=[\[,])-?0\.0(?=[,\]])")


def _compact(obj: Any) -> str:
    """JSON without spaces and with 0.0 written as 0: most of a feature's context activations are zero."""
    return _ZERO.sub("0", json.dumps(obj, separators=(",", ":")))


def _examples(seq: np.ndarray, pos: np.ndarray, value: np.ndarray, window: np.ndarray, before: int,
              decimals: int) -> list[list[Any]]:
    """Serialisable examples from one unit's arrays ([n], [n], [n], [n, w]); empty slots (seq < 0) dropped."""
    out = []
    rounded = np.round(window.astype(np.float64), decimals)
    valid = ~np.isnan(rounded)
    values = np.round(value.astype(np.float64), decimals).tolist()
    for i in np.flatnonzero(seq >= 0).tolist():
        cols = np.flatnonzero(valid[i])
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        p = int(pos[i])
        out.append([int(seq[i]), p, values[i], p - before + lo, rounded[i, lo:hi].tolist()])
    return out


def _unit_rows(res: KindResult, analysis: Analysis, vocab: list[str],
               tokens: np.ndarray) -> Iterable[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """(units row, unit_details row) per unit of one kind."""
    s = analysis.settings
    before, n_tok = s["window_before"], analysis.n_tokens
    n_fires = res.n_fires.numpy()
    mean = (res.sum_act / res.n_fires.clamp_min(1)).numpy()
    max_act = res.max_act.double().numpy()
    hist = res.hist.numpy()
    top = {k: v.numpy() for k, v in res.top.items()}
    iv = {k: v.numpy() for k, v in res.intervals.items()}
    width = res.interval_width.double().numpy()
    counts = res.interval_counts.numpy()
    logits = {k: v.numpy() for k, v in res.logits.items()} if res.logits is not None else None

    def related(pair: tuple[Any, Any] | None, i: int) -> str | None:
        if pair is None:
            return None
        ids, vals = pair[0][i].tolist(), np.round(pair[1][i].double().numpy(), 4).tolist()
        return _compact([[a, b] for a, b in zip(ids, vals, strict=True) if math.isfinite(b) and b != 0])

    def tok(i: int) -> str:
        return vocab[i] if 0 <= i < len(vocab) else f"<{i}>"

    for i in range(res.n_units):
        n = int(n_fires[i])
        freq = n / max(n_tok, 1)
        dec = _decimals(float(max_act[i]))
        top_ex = _examples(top["seq"][i], top["pos"][i], top["value"][i], top["window"][i], before, dec)
        intervals = []
        total = int(counts[i].sum())
        for j in np.flatnonzero(counts[i]).tolist():
            ex = _examples(iv["seq"][i, j], iv["pos"][i, j], iv["value"][i, j], iv["window"][i, j], before, dec)
            intervals.append({"min": j * width[i], "max": (j + 1) * width[i], "count": int(counts[i, j]),
                              "share": round(int(counts[i, j]) / total, 6), "examples": ex})
        h = hist[i]
        nz = np.flatnonzero(h)
        hist_json = [int(nz[0]), h[nz[0]:nz[-1] + 1].tolist()] if len(nz) else [0, []]
        top_tokens = list(dict.fromkeys(tok(int(tokens[e[0], e[1]])) for e in top_ex))
        logit_json, pos_tokens = None, []
        if logits is not None:
            pos = [[int(t), tok(int(t)), round(float(v), 4)] for t, v in zip(logits["pos_ids"][i],
                                                                              logits["pos_values"][i], strict=True)]
            neg = [[int(t), tok(int(t)), round(float(v), 4)] for t, v in zip(logits["neg_ids"][i],
                                                                              logits["neg_values"][i], strict=True)]
            logit_json = _compact({"pos": pos, "neg": neg, "hist": [round(float(logits["hist_lo"][i]), 4),
                                                                      round(float(logits["hist_hi"][i]), 4),
                                                                      logits["hist"][i].tolist()]})
            pos_tokens = [p[1] for p in pos]
        yield ((res.kind, i, _status(n, freq, s["dense_threshold"]), n, freq, float(mean[i]), float(max_act[i]),
                " | ".join(top_tokens), " | ".join(pos_tokens)),
               (res.kind, i, _compact(hist_json), _compact(top_ex), _compact(intervals), logit_json,
                related(res.neighbours, i), related(res.cofiring, i), related(res.correlated, i),
                related(res.aligned, i)))


def _checkpoint(path: Path) -> None:
    """Fold an existing store's WAL into it, so nothing of it is left beside the file that replaces it."""
    try:
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
    except sqlite3.DatabaseError:
        pass


def write_store(path: str | Path, analysis: Analysis, *, vocab: list[str], meta: dict[str, Any]) -> Path:
    """Write the analysis as a store at `path`, atomically; the labeler's tables of an existing store at `path`
    are carried over when it describes the same SAE (`meta['sae_sha256']`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    old_sae = None
    if path.is_file():
        _checkpoint(path)
        try:
            with FeatureStore.open(path) as old:
                old_sae = old.meta.get("sae_sha256")
        except SaekitError:
            old_sae = None
    carry = old_sae is not None and old_sae == meta.get("sae_sha256")
    tokens = analysis.tokens.numpy()
    kinds = analysis.kinds
    full_meta = {"format": STORE_FORMAT, "schema_version": SCHEMA_VERSION, "saekit_version": saekit.__version__,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "example_layout": EXAMPLE_LAYOUT,
                 "n_features": kinds["feature"].n_units if "feature" in kinds else 0,
                 "n_neurons": kinds["neuron"].n_units if "neuron" in kinds else 0,
                 "n_tokens": analysis.n_tokens, "n_sequences": len(tokens), "analysis": analysis.settings, **meta}

    def build(tmp: Path) -> None:
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA journal_mode = OFF")  # the rename is the commit; no journal needed while building
            con.execute("PRAGMA synchronous = OFF")
            con.executescript(SCHEMA)
            with con:
                con.executemany("INSERT INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in full_meta.items()))
                con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(vocab))
                con.executemany("INSERT INTO sequences VALUES (?, ?, ?, ?)",
                                ((i, split, idx, _compact(tokens[i].tolist()))
                                 for i, (split, idx) in enumerate(analysis.sources)))
                for res in kinds.values():
                    rows = list(_unit_rows(res, analysis, vocab, tokens))
                    con.executemany("INSERT INTO units VALUES (?,?,?,?,?,?,?,?,?)", (r[0] for r in rows))
                    con.executemany("INSERT INTO unit_details VALUES (?,?,?,?,?,?,?,?,?,?)", (r[1] for r in rows))
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
