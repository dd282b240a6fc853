"""The entity-attribute labeler: which SAE features and which MLP neurons of the SAE's layer encode an attribute
value of an entity ("Kenya" -> continent = Africa), how well an attribute can be read from them, and whether
the model uses them.

Fact-recall studies found early MLP layers acting as a lookup from an entity's tokens to attribute directions,
with single neurons there heavily polysemantic. This package measures that for one SAE, in five steps
(`knowledge`, `scoring`, `probes`, `causal`; `labeler.label` runs them, `run.run_label` around the feature store):

1. Knowledge filter. An (entity, attribute) pair is kept only if the model knows it: averaged over the first
   `templates` attribute prompts, the log-probability of the first token of " <correct value>" is the highest
   among the first tokens of all the attribute's values. (Values whose answers share a first token cannot be
   told apart at that token; they count as one candidate and are listed in the report.) The kept fraction per
   attribute is reported.
2. Attribute scores. The entity's *context* prompt ("The country Kenya") runs to the SAE's layer; each unit's
   activation is read at the entity's last token (`pooling: last`) or max-pooled over its tokens (`max`), for
   every SAE feature and every neuron (`blocks.L.mlp.hook_post`). For every unit and every value:
   precision, recall and F1 of "the unit is on" against "the entity has the value", AUROC of the activation,
   and the support (known entities with the value). A neuron is never off in the "fires" sense (SiLU-gated
   activations are nonzero almost everywhere), so "on" is "above the threshold that maximises the unit's F1 for
   that value", and by default features get the same rule, so features and neurons are compared like for like
   (`feature_on: fires` uses activation > 0 for features instead). All of it is a few matrix products and one
   sort per attribute.
3. Tags: a unit is tagged with a value when F1 >= `min_f1` (0.6: it fires on most of the value's entities and
   mostly on them), AUROC >= `min_auroc` (0.85: its activation ranks the value's entities far above the rest,
   which an always-on unit of a majority value cannot fake -- F1 alone can be 0.87 for such a unit when 77% of
   entities share the value) and support >= `min_positives` (10: below that, F1 = 1 happens by chance among
   thousands of units). A tag lists the entities behind it (those it fires on).
4. Probes (`probes.py`): held-out accuracy of a full linear probe on the SAE's input activations and
   of the best 1-sparse and k-sparse probes on features and on neurons.
5. Causal check, for the best tag of each value (up to `causal_tags` per kind): on up to `causal_prompts`
   attribute prompts of the value's known entities where the unit is on, remove the unit's contribution at the
   entity's tokens and measure the drop of the correct answer's log-probability, against `causal_controls`
   frequency-matched random units of the same kind removed the same way. The per-prompt differences give the
   tag's `causal_effect` (nats) with a bootstrap interval and a one-sided paired sign-flip p-value, Holm-corrected
   across every tag tested; "causal" needs Holm p < 0.05 and an effect of at least `causal_min_effect` (see
   `causal.py`). Feature tags are also steered toward another value.
"""


from features.labeling.config import LabelConfig
from features.labeling.entities import (
    PLACEHOLDER,
    AttributeTemplates,
    EntitySet,
    load_builtin_entity_sets,
    load_entities,
    load_entity_set,
    load_entity_sets,
    save_entity_set,
    usable_attributes,
)
from features.labeling.labeler import label, sample_entities
from features.labeling.results import AttributeReport, CausalResult, LabelOutcome, LabelResult
from features.labeling.run import run_label
from features.labeling.semantics import score_store, to_store_rows

__all__ = ["PLACEHOLDER", "AttributeReport", "AttributeTemplates", "CausalResult", "EntitySet", "LabelConfig",
           "LabelOutcome", "LabelResult", "label", "load_builtin_entity_sets", "load_entities", "load_entity_set",
           "load_entity_sets", "run_label", "sample_entities", "save_entity_set", "score_store", "to_store_rows",
           "usable_attributes"]
