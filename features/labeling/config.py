"""The `label` section of a run config: which entities to label against, and the labeler's thresholds.

The thresholds are justified in `features/labeling/__init__.py`'s docstring; bad values are refused here, when the
config is built, so a run never loads a model only to fail on a setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from sae.errors import SaekitError


@dataclass
class LabelConfig:
    """The entity-attribute labeler and monosemanticity scores (features/labeling)."""

    POSITIVE: ClassVar[tuple[str, ...]] = ("max_entities", "templates", "batch_size", "min_class_size",
                                           "min_positives", "probe_k", "probe_steps", "causal_prompts")

    sae: str | None = None  # SAE id under saes/ to label; None: every SAE of train.saes
    entities: str = "builtin"  # "builtin" (features/data) or a folder of <name>.csv + <name>.templates.json
    entity_types: list[str] | None = None  # only these entity types; None: all in `entities`
    max_entities: int | None = 300  # per entity type, a deterministic sample (by name hash); None: all
    templates: int = 1  # attribute prompts per attribute the knowledge filter averages over (the first n)
    knowledge_filter: bool = True  # keep only entities whose attribute the model ranks first among the values
    pooling: Literal["last", "max"] = "last"  # the entity's last token, or max over its tokens
    start_token: bool = True  # begin prompts with the corpus's document separator, as the training text does
    batch_size: int = 64  # prompts per forward pass
    min_class_size: int = 5  # a value needs this many known entities to be scored or probed
    min_positives: int = 10  # ... and this many to be tagged
    feature_on: Literal["best_f1", "fires"] = "best_f1"  # "on" for a feature: above its best-F1 threshold, the
    # rule neurons get (a like-for-like comparison), or any firing (activation > 0)
    min_f1: float = 0.6
    min_auroc: float = 0.85
    test_fraction: float = 0.25  # held-out share of each value's entities for the probes
    probe_k: int = 8  # units in the k-sparse probe
    probe_l2: float = 1e-2  # on standardised inputs; 1e-3..1e-1 give mean accuracies within 1%
    probe_steps: int = 200  # LBFGS iterations
    causal_tags: int = 24  # tags checked causally per kind (the best tag of each value, round-robin); 0: none
    causal_prompts: int = 16  # attribute prompts per checked tag (n prompts: the smallest p-value is 2^-n)
    causal_controls: int = 10  # random units ablated for comparison per checked tag
    causal_min_effect: float = 0.1  # nats: smallest mean log-prob drop that counts as causal
    semantics: bool = True  # also score every unit's monosemanticity from the store's examples
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("min_f1", "min_auroc", "test_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise SaekitError(f"key 'label.{key}' must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise SaekitError("key 'label.test_fraction' must be strictly between 0 and 1")
        if self.min_class_size < 2:
            raise SaekitError("key 'label.min_class_size' must be at least 2 (one to train, one to test)")
        if self.causal_tags < 0 or self.causal_controls < 0 or self.probe_l2 < 0:
            raise SaekitError("keys 'label.causal_tags', 'label.causal_controls' and 'label.probe_l2' must be >= 0")
