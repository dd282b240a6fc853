"""What goes into and comes out of a feature store, as plain dataclasses.

Readers get `UnitSummary` / `Unit` and the labeler's records; the writer takes `UnitRecord` and
`SequenceRecord`, which any producer can fill: the store knows nothing of the pass that made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sae.errors import SaekitError

Kind = Literal["feature", "neuron"]  # an SAE feature, or an MLP neuron of the SAE's layer
KINDS: tuple[Kind, ...] = get_args(Kind)
Status = Literal["live", "dead", "dense"]
STATUSES: tuple[Status, ...] = get_args(Status)


def check_kind(kind: str) -> Kind:
    """`kind` if it is a unit kind, else one clear error (kinds arrive from URLs, CLI flags and callers)."""
    if kind not in KINDS:
        raise SaekitError(f"unknown unit kind '{kind}'; use 'feature' or 'neuron'")
    return kind  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Written by the analysis pass


StoredExample = tuple[int, int, float, int, list[float]]  # seq, pos, value, start, acts (EXAMPLE_LAYOUT)
Related = list[tuple[int, float]]  # (other unit's index, value), best first


@dataclass(frozen=True)
class IntervalRecord:
    """One activation interval [min, max) of a unit: its count, share of the unit's firings, and examples."""

    min: float
    max: float
    count: int
    share: float
    examples: list[StoredExample]


@dataclass(frozen=True)
class LogitRecord:
    """Output tokens a unit promotes (pos) and suppresses (neg) as (id, text, value), and the histogram of
    its effect over a vocabulary sample as (min, max, counts in equal-width bins)."""

    pos: list[tuple[int, str, float]]
    neg: list[tuple[int, str, float]]
    hist: tuple[float, float, list[int]]


@dataclass(frozen=True)
class UnitRecord:
    """Everything the store keeps about one unit; the writer turns it into a `units` and a `unit_details` row."""

    kind: Kind
    index: int
    status: Status
    n_fires: int
    freq: float
    mean_act: float  # over firing tokens
    max_act: float
    threshold: float  # the unit is on (fires) where its activation exceeds this (features/analyze/on_rule.py)
    top_tokens: list[str]  # searchable text: the example tokens of the top contexts
    pos_tokens: list[str]  # ... and the top promoted output tokens
    hist: tuple[int, list[int]]  # (first bin, counts) over the store's meta.analysis.hist_edges
    top_examples: list[StoredExample]
    intervals: list[IntervalRecord]
    cofiring: Related
    logits: LogitRecord | None = None
    neighbours: Related | None = None
    correlated: Related | None = None  # units of the other kind
    aligned: Related | None = None  # features: neurons by cosine with W_out


@dataclass(frozen=True)
class UnitStats:
    """Per unit of one kind, in index order: what the labeler needs of the analysis pass to apply the same "on"
    rule and to match random controls (firing frequency, mean activation when on, on threshold)."""

    freq: list[float]
    mean_act: list[float]
    threshold: list[float]


@dataclass(frozen=True)
class SequenceRecord:
    """An analysed sequence: its token ids and where it came from (split, index in that split)."""

    split: str
    index: int
    tokens: list[int]


# ---------------------------------------------------------------------------------------------
# Read back


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
class UnitSummary:
    """One row of a list: statistics, search text, best explanation and semantic class if the labeler set them."""

    kind: Kind
    index: int
    status: Status
    n_fires: int
    freq: float
    mean_act: float
    max_act: float
    top_tokens: list[str]
    pos_tokens: list[str]
    explanation: str | None
    semantic_class: str | None
    semantic_score: float | None
    threshold: float  # on (firing) = activation above this


# ---------------------------------------------------------------------------------------------
# Written by the labeler


@dataclass(frozen=True)
class Tag:
    """The labeler's finding that a unit encodes entity_type.attribute = value (written to `tags`)."""

    kind: Kind
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
    causal_effect: float | None = None  # nats: mean over prompts of (unit's ablation drop - controls' mean drop)
    causal_status: str | None = None
    causal_p: float | None = None  # Holm-corrected p-value of the sign-flip test over prompts
    causal_ci: tuple[float, float] | None = None  # 95% bootstrap interval of causal_effect


@dataclass(frozen=True)
class Semantics:
    """A unit's mono/polysemanticity: `cls` is 'monosemantic', 'polysemantic' or 'dead' (column `class`)."""

    kind: Kind
    index: int
    score: float | None
    cls: str
    concepts: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Probe:
    """A probe for an attribute read from one kind of unit (e.g. logistic regression on feature activations)."""

    kind: Kind
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
    """A text explanation of a unit, its score and who wrote it."""

    kind: Kind
    index: int
    text: str
    score: float | None = None
    source: str = ""


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
    neighbours: Related = field(default_factory=list)  # cosine of output directions
    cofiring: Related = field(default_factory=list)  # share of this unit's firings
    correlated: Related = field(default_factory=list)  # Pearson r with the other kind
    aligned: Related = field(default_factory=list)  # features: neurons by cosine with W_out
    tags: list[Tag] = field(default_factory=list)
    semantics: Semantics | None = None
    explanations: list[Explanation] = field(default_factory=list)
