"""Reading a feature store (and the labeler's writes to it): `FeatureStore` turns rows into typed records.

Lists are one query over the slim `units` table; a unit's page reads one `unit_details` row and the
sequences its examples come from, so a page costs the same whatever the store's size.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.store import query
from features.store.query import COUNT_SQL, SUMMARY_SQL, UnitQuery
from features.store.records import (
    KINDS,
    Example,
    Explanation,
    Interval,
    Kind,
    Probe,
    Semantics,
    Tag,
    Unit,
    UnitStats,
    UnitSummary,
    check_kind,
)
from features.store.schema import connect
from sae.errors import SaekitError

ALL_UNITS = UnitQuery()  # every feature, in index order: the default list


def _split(text: str) -> list[str]:
    return text.split(" | ") if text else []


def _summary(row: Sequence[Any]) -> UnitSummary:
    return UnitSummary(row[0], row[1], row[2], row[3], row[4], row[5], row[6], _split(row[7]), _split(row[8]),
                       row[9], row[10], row[11], row[12])


def _pairs(text: str | None) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in json.loads(text)] if text else []


def density_note(counts: dict[str, int]) -> str:
    """What a kind's counts reading "all dense" means, or "": every unit is on (above its threshold) for more than
    the dense share of tokens, so its firing says little and its monosemanticity is the comparison that does.
    With the on rule (features/analyze/on_rule.py) neurons are never all dense; an SAE's features can be."""
    if counts.get("total") and counts.get("dense") == counts["total"]:
        return ("all count as dense: every unit is on for more than the dense share of tokens, so judge them by "
                "monosemanticity")
    return ""


class FeatureStore:
    """Typed queries over one store file. Open with `FeatureStore.open(path)` (read-only unless writable)."""

    def __init__(self, con: sqlite3.Connection, path: Path) -> None:
        self.con, self.path = con, path
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        self._vocab: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> FeatureStore:
        """Open the store file at `path`; refused with one clear message unless it is a store of this schema."""
        path = Path(path)
        return cls(connect(path, writable), path)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- units ---------------------------------------------------------------------------------------

    def n_units(self, kind: Kind = "feature") -> int:
        return int(self.meta.get(f"n_{check_kind(kind)}s", 0))

    def _check_index(self, kind: Kind, index: int) -> None:
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

    def unit(self, kind: Kind, index: int) -> Unit:
        """Everything about one unit: one row from each of units and unit_details, the sequences its examples
        come from, and the labeler's rows for it."""
        self._check_index(check_kind(kind), index)
        index = int(index)
        row = self.con.execute(SUMMARY_SQL + " WHERE u.kind = ? AND u.idx = ?", (kind, index)).fetchone()
        det = self.con.execute(self._DETAIL_SQL + " WHERE kind = ? AND idx = ?", (kind, index)).fetchone()
        seqs = sorted({e[0] for e in json.loads(det[1])} |
                      {e[0] for iv in json.loads(det[2]) for e in iv["examples"]})
        marks = ",".join("?" * len(seqs))
        tokens = {s: json.loads(t) for s, t in
                  self.con.execute(f"SELECT seq, tokens FROM sequences WHERE seq IN ({marks})", seqs)}
        return self._build(row, det, tokens, self.tags_for(kind, index), self.semantics_for(kind, index),
                           self.explanations_for(kind, index))

    def iter_units(self, kind: Kind = "feature") -> Iterator[Unit]:
        """Every unit of a kind in index order, reading each table once (for exports)."""
        kind = check_kind(kind)
        tokens = {s: json.loads(t) for s, t in self.con.execute("SELECT seq, tokens FROM sequences")}
        tags: dict[int, list[Tag]] = {}
        for t in self.find_tags(kind=kind, limit=None):
            tags.setdefault(t.index, []).append(t)
        sem = {s.index: s for s in self.semantics(kind)}
        expl: dict[int, list[Explanation]] = {}
        for r in self.con.execute("SELECT * FROM explanations WHERE kind = ? ORDER BY score DESC NULLS LAST",
                                  (kind,)):
            expl.setdefault(r[1], []).append(Explanation(*r))
        rows = self.con.execute(SUMMARY_SQL + " WHERE u.kind = ? ORDER BY u.idx", (kind,))
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

    def search(self, q: UnitQuery = ALL_UNITS, limit: int = 50, offset: int = 0) -> list[UnitSummary]:
        """A page of the units `q` selects, in its order."""
        where, args = query.where(q)
        sql = f"{SUMMARY_SQL}{where}{query.order(q)} LIMIT ? OFFSET ?"
        return [_summary(r) for r in self.con.execute(sql, (*args, int(limit), int(offset)))]

    def count(self, q: UnitQuery = ALL_UNITS) -> int:
        """How many units `search` with the same query would page through."""
        where, args = query.where(q)
        return int(self.con.execute(COUNT_SQL + where, args).fetchone()[0])

    def top(self, by: str = "max_act", kind: Kind = "feature", limit: int = 20, offset: int = 0,
            descending: bool = True, include_dead: bool = False) -> list[UnitSummary]:
        """The units ranked by one statistic (dead units left out unless asked for)."""
        q = UnitQuery(kind=kind, include_dead=include_dead, order_by=by, descending=descending)
        return self.search(q, limit, offset)

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

    # -- bulk queries for the viewer (features/viewer) ------------------------------------------------

    def unit_table(self, kind: Kind = "feature") -> dict[str, list[Any]]:
        """Every unit of a kind as columns (idx, status, n_fires, freq, mean_act, max_act, top_tokens, semantic
        class and score, tag count, best tag f1, on threshold), in index order: one query for plots and exports."""
        cols = ["idx", "status", "n_fires", "freq", "mean_act", "max_act", "top_tokens", "semantic_class",
                "semantic_score", "n_tags", "best_f1", "threshold"]
        rows = self.con.execute(
            "SELECT u.idx, u.status, u.n_fires, u.freq, u.mean_act, u.max_act, u.top_tokens, s.class, s.score, "
            "t.n, t.f1, u.threshold FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx "
            "LEFT JOIN (SELECT idx, COUNT(*) AS n, MAX(f1) AS f1 FROM tags WHERE kind = ?1 GROUP BY idx) t "
            "ON t.idx = u.idx WHERE u.kind = ?1 ORDER BY u.idx", (check_kind(kind),)).fetchall()
        out = {c: list(v) for c, v in zip(cols, zip(*rows, strict=True), strict=True)} if rows else \
            {c: [] for c in cols}
        out["n_tags"] = [n or 0 for n in out["n_tags"]]
        return out

    def unit_stats(self) -> dict[Kind, UnitStats]:
        """Per kind in the store: every unit's firing frequency, mean activation when on and on threshold, in index
        order (what the labeler needs to apply the same on rule and to match random controls)."""
        out: dict[Kind, UnitStats] = {}
        for kind in KINDS:
            rows = self.con.execute("SELECT freq, mean_act, threshold FROM units WHERE kind = ? ORDER BY idx",
                                    (kind,)).fetchall()
            if rows:
                freq, mean_act, threshold = (list(c) for c in zip(*rows, strict=True))
                out[kind] = UnitStats(freq, mean_act, threshold)
        return out

    def summaries(self, kind: Kind, indices: Iterable[int]) -> dict[int, UnitSummary]:
        """List rows of the given units (unknown indices left out), e.g. to label links to related units."""
        ids = sorted({int(i) for i in indices})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.con.execute(f"{SUMMARY_SQL} WHERE u.kind = ? AND u.idx IN ({marks})", (check_kind(kind), *ids))
        return {r[1]: _summary(r) for r in rows}

    def tag_values(self, kind: Kind | None = None) -> list[tuple[str, str, str, int]]:
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
            self._check_index(check_kind(r.kind), r.index)

    def write_tags(self, tags: Iterable[Tag], replace: bool = True) -> int:
        """Store the labeler's tags (replace: drop every existing tag first). Returns how many were written."""
        tags = list(tags)
        self._check_rows(tags)
        return self._write("INSERT INTO tags VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           ((t.kind, int(t.index), t.entity_type, t.attribute, t.value, t.precision, t.recall, t.f1,
                             t.auroc, t.support, json.dumps(list(t.entities)), t.causal_effect, t.causal_status,
                             t.causal_p, *(t.causal_ci if t.causal_ci is not None else (None, None)))
                            for t in tags), "DELETE FROM tags" if replace else None)

    def tags_for(self, kind: Kind, index: int) -> list[Tag]:
        return self.find_tags(kind=kind, index=index, limit=None)

    def find_tags(self, entity_type: str | None = None, attribute: str | None = None, value: str | None = None,
                  kind: Kind | None = None, index: int | None = None, min_f1: float | None = None,
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
        return [Tag(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], json.loads(r[10]), r[11], r[12],
                    r[13], None if r[14] is None else (r[14], r[15]))
                for r in self.con.execute(sql, (*args, -1 if limit is None else int(limit)))]

    def write_semantics(self, rows: Iterable[Semantics], replace: bool = False) -> int:
        """Store mono/polysemanticity per unit (a unit's row is replaced; replace: drop all rows first)."""
        rows = list(rows)
        self._check_rows(rows)
        return self._write("INSERT OR REPLACE INTO semantics VALUES (?,?,?,?,?)",
                           ((r.kind, int(r.index), r.score, r.cls, json.dumps(r.concepts)) for r in rows),
                           "DELETE FROM semantics" if replace else None)

    def semantics_for(self, kind: Kind, index: int) -> Semantics | None:
        row = self.con.execute("SELECT * FROM semantics WHERE kind = ? AND idx = ?", (kind, index)).fetchone()
        return Semantics(row[0], row[1], row[2], row[3], json.loads(row[4])) if row else None

    def semantics(self, kind: Kind = "feature", cls: str | None = None) -> list[Semantics]:
        sql, args = "SELECT * FROM semantics WHERE kind = ?", [check_kind(kind)]
        if cls is not None:
            sql += " AND class = ?"
            args.append(cls)
        return [Semantics(r[0], r[1], r[2], r[3], json.loads(r[4]))
                for r in self.con.execute(sql + " ORDER BY idx", args)]

    def write_probes(self, rows: Iterable[Probe], replace: bool = True) -> int:
        rows = list(rows)
        for r in rows:
            check_kind(r.kind)
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

    def explanations_for(self, kind: Kind, index: int) -> list[Explanation]:
        return [Explanation(*r) for r in self.con.execute(
            "SELECT * FROM explanations WHERE kind = ? AND idx = ? ORDER BY score DESC NULLS LAST", (kind, index))]


def read_fingerprint(path: Path) -> str | None:
    """The input fingerprint of an existing store of the current schema, else None (absent, damaged, old)."""
    try:
        with FeatureStore.open(path) as store:
            return store.meta.get("fingerprint")
    except SaekitError:
        return None
