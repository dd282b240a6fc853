"""Which units a list shows: one `UnitQuery` value for search, filters and order, turned into SQL here.

A single object (rather than a dozen keyword filters on every list method) lets the viewer keep its
current query in one place and hand it to both `FeatureStore.search` and `FeatureStore.count`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from features.store.records import STATUSES, Kind, check_kind
from sae.errors import SaekitError

ORDER_COLUMNS = {"idx": "u.idx", "freq": "u.freq", "max_act": "u.max_act", "mean_act": "u.mean_act",
                 "n_fires": "u.n_fires", "semantic_score": "s.score",
                 "f1": "(SELECT MAX(t.f1) FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx)"}

# Units with their best explanation and semantic class; every list query is this plus WHERE / ORDER BY.
SUMMARY_SQL = """SELECT u.kind, u.idx, u.status, u.n_fires, u.freq, u.mean_act, u.max_act, u.top_tokens,
    u.pos_tokens,
    (SELECT e.text FROM explanations e WHERE e.kind = u.kind AND e.idx = u.idx ORDER BY e.score DESC LIMIT 1),
    s.class, s.score, u.threshold
FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx"""
COUNT_SQL = "SELECT COUNT(*) FROM units u LEFT JOIN semantics s ON s.kind = u.kind AND s.idx = u.idx"

_TEXT_MATCH = ("u.top_tokens LIKE ?1 ESCAPE '\\' OR u.pos_tokens LIKE ?1 ESCAPE '\\' OR EXISTS (SELECT 1 FROM "
               "explanations e WHERE e.kind = u.kind AND e.idx = u.idx AND e.text LIKE ?1 ESCAPE '\\') OR "
               "EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx AND (t.attribute LIKE ?1 "
               "ESCAPE '\\' OR t.value LIKE ?1 ESCAPE '\\' OR t.entity_type LIKE ?1 ESCAPE '\\'))")


@dataclass(frozen=True)
class UnitQuery:
    """Units of one kind whose top tokens, top logit tokens, explanations or tags contain `text` (or whose
    index it is), filtered, in `order_by` order (idx, freq, max_act, mean_act, n_fires, semantic_score, f1).
    `tag` is (entity_type, attribute, value), each None for any: only units with such a tag."""

    text: str = ""
    kind: Kind = "feature"
    status: str | None = None
    min_freq: float | None = None
    max_freq: float | None = None
    min_max_act: float | None = None
    semantic_class: str | None = None
    tagged: bool | None = None
    include_dead: bool = True
    tag: tuple[str | None, str | None, str | None] | None = None
    order_by: str = "idx"
    descending: bool = False

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if self.status is not None and self.status not in STATUSES:
            raise SaekitError(f"unknown status '{self.status}'; use 'live', 'dead' or 'dense'")
        if self.order_by not in ORDER_COLUMNS:
            raise SaekitError(f"cannot order by '{self.order_by}'; choose one of {', '.join(ORDER_COLUMNS)}")


def where(q: UnitQuery) -> tuple[str, list[Any]]:
    """The WHERE clause (over `units u` and `semantics s`) of a query, and its arguments."""
    clauses, args = ["u.kind = ?"], [q.kind]
    if q.status is not None:
        clauses.append("u.status = ?")
        args.append(q.status)
    elif not q.include_dead:
        clauses.append("u.status != 'dead'")
    for col, op, value in (("u.freq", ">=", q.min_freq), ("u.freq", "<=", q.max_freq),
                           ("u.max_act", ">=", q.min_max_act)):
        if value is not None:
            clauses.append(f"{col} {op} ?")
            args.append(float(value))
    if q.semantic_class is not None:
        clauses.append("s.class = ?")
        args.append(q.semantic_class)
    if q.tagged is not None:
        clauses.append(("" if q.tagged else "NOT ") + "EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND "
                       "t.idx = u.idx)")
    if q.tag is not None and any(v is not None for v in q.tag):
        parts = []
        for col, v in zip(("entity_type", "attribute", "value"), q.tag, strict=True):
            if v is not None:
                parts.append(f" AND t.{col} = ?")
                args.append(v)
        clauses.append("EXISTS (SELECT 1 FROM tags t WHERE t.kind = u.kind AND t.idx = u.idx" + "".join(parts) + ")")
    text = q.text.strip()
    if text:
        clauses.append(_text_clause(text, args))
    return " WHERE " + " AND ".join(clauses), args


def _text_clause(text: str, args: list[Any]) -> str:
    """Case-insensitive substring match (LIKE wildcards taken literally), or the unit's index for a number."""
    like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    n = len(args) + 1
    clause = _TEXT_MATCH.replace("?1", f"?{n}")
    args.append(like)
    if text.isdigit():
        clause = f"u.idx = ?{n + 1} OR " + clause
        args.append(int(text))
    return f"({clause})"


def order(q: UnitQuery) -> str:
    """The ORDER BY clause: the chosen column (missing values last), ties by index."""
    return f" ORDER BY {ORDER_COLUMNS[q.order_by]} {'DESC' if q.descending else 'ASC'} NULLS LAST, u.idx"
