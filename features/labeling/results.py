"""What the labeler found, as plain records: per attribute, per causal check, and for a whole SAE.

These are the labeler's output and the report's input; nothing here runs a model or writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

from features.store import Kind, Probe, Tag


class UnitOn(NamedTuple):
    """One kind's units as the labeler judges them, in index order [U]: firing frequency, mean activation when on,
    and the on threshold (features/analyze/on_rule.py), from the feature store or, without one, the labeler's own
    entity prompts under the same rule."""

    freq: Tensor
    mean_act: Tensor
    threshold: Tensor


@dataclass
class AttributeReport:
    """What happened to one attribute: sizes, the knowledge filter, why it was skipped, its tags."""

    entity_type: str
    attribute: str
    n_entities: int
    n_values: int
    n_known: int | None = None
    kept_fraction: float | None = None
    values: list[tuple[str, int]] = field(default_factory=list)  # (value, known entities) used for scoring
    dropped_values: list[tuple[str, int]] = field(default_factory=list)  # too few known entities
    collisions: list[list[str]] = field(default_factory=list)  # values sharing an answer's first token
    skipped: str | None = None
    n_tags: dict[str, int] = field(default_factory=dict)
    n_tags_ci: dict[str, list[float]] = field(default_factory=dict)  # kind -> 95% bootstrap CI over entities
    best: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> best unit per value

    @property
    def name(self) -> str:
        return f"{self.entity_type}.{self.attribute}"


@dataclass
class CausalResult:
    """One tag's ablation (and, for features, steering) test over prompts against frequency-matched random units
    of the same kind (see `causal`)."""

    kind: Kind
    index: int
    entity_type: str
    attribute: str
    value: str
    n_prompts: int
    drop: float | None = None  # mean drop in the correct answer's log-prob when the unit is removed (nats)
    control_drops: list[float] = field(default_factory=list)  # per control unit, its mean drop over the prompts
    control_mean: float | None = None  # mean over prompts of the controls' mean drop
    diffs: list[float] = field(default_factory=list)  # per prompt: the unit's drop - the controls' mean drop
    effect: float | None = None  # mean of diffs (nats)
    effect_ci: list[float] | None = None  # its 95% bootstrap interval over prompts
    p: float | None = None  # one-sided sign-flip p-value of mean diff > 0
    p_holm: float | None = None  # ... Holm-corrected across every tag tested
    status: str = "not tested"
    reason: str = ""
    steer_value: str | None = None  # the other value steered towards
    steer_shift: float | None = None  # mean change of log p(other) - log p(this), nats
    steer_flip: float | None = None  # share of prompts whose best candidate became the other value


@dataclass
class LabelResult:
    """Everything one labeling of one SAE produced; `settings` records what it ran with."""

    attributes: list[AttributeReport]
    tags: list[Tag]
    probes: list[Probe]
    causal: list[CausalResult]
    settings: dict[str, Any]
    timings: dict[str, float]
    # 95% bootstrap CIs over entities of the per-kind totals: {"tags": {kind: [lo, hi]}, "attributes_tagged": ...}
    cis: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # the activations the scores came from, for callers that study them: per entity type {"names", "input",
    # "feature", "neuron"} and per attribute {"entity_type", "rows" (into the type's names), "labels", "values"}
    data: dict[str, Any] = field(default_factory=dict)


class LabelOutcome(NamedTuple):
    """What `run_label` hands the report: the result, the monosemanticity summary (None when not scored) and
    where the numbers came from (`meta`: sae_id, model_name, store, entity_types, eval)."""

    result: LabelResult
    semantics: dict[str, Any] | None
    meta: dict[str, Any]
