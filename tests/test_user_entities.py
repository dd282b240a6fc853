"""Any user entity set works unchanged: an entity type that does not ship with saekit (musical instruments ->
family), written as a user would (a CSV and a templates file in the format of features/data/README.md), labeled
on the real model through `run_label` on a small analysed store, with tags, probes, semantics and the report; and
an entity type the model does not know, which ends in one clear log line while the report is still written."""

from __future__ import annotations

import json

import pytest
import torch

from features.analyze import AnalyzeConfig, run_analysis
from features.labeling import LabelConfig, run_label
from features.layout import store_in
from features.report import write_report
from features.store import FeatureStore
from sae import corpus
from sae.formats import save_sae
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

FAMILIES = {
    "string": "violin viola cello guitar harp banjo mandolin ukulele sitar lute zither lyre balalaika harpsichord",
    "wind": "flute clarinet oboe bassoon saxophone trumpet trombone tuba piccolo recorder bagpipes harmonica cornet "
            "bugle",
    "percussion": "drum xylophone tambourine cymbal marimba timpani triangle glockenspiel bongo castanets gong "
                  "vibraphone maracas cowbell",
}
INSTRUMENT_TEMPLATES = {
    "entity_type": "instrument",
    "description": "Musical instruments by family (a user's own entity type, not a built-in one).",
    "context_template": "The musical instrument called the {entity}",
    "attributes": {"family": {"templates": ["The {entity} is a musical instrument. It belongs to the family of"]}},
}
# Made-up gadgets with made-up colours: the model cannot know them, so the knowledge filter keeps too few.
GADGETS = ["Quorvex", "Blintaro", "Zephmir", "Traskel", "Vondrip", "Glimmox", "Parvulon", "Snekto", "Urbanix",
           "Wobblet", "Kresh", "Dorvani", "Fizzlan", "Mortab", "Yantrel", "Clovik", "Harbex", "Jindle", "Nuxor",
           "Plimvo", "Razzik", "Sorbel", "Tuvmar", "Vextol", "Grondle", "Lumbix", "Orvatz", "Quibble", "Xantro",
           "Zirkle"]
GADGET_TEMPLATES = {
    "entity_type": "gadget",
    "context_template": "The gadget {entity}",
    "attributes": {"colour": {"templates": ["The gadget {entity} is painted"]}},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_entity_files(folder) -> None:
    """The two entity types as a user writes them: <name>.csv plus <name>.templates.json side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{name},{family}" for family, names in FAMILIES.items() for name in names.split()]
    (folder / "instruments.csv").write_text("entity,family\n" + "\n".join(rows) + "\n")
    (folder / "instruments.templates.json").write_text(json.dumps(INSTRUMENT_TEMPLATES, indent=2))
    rows = [f"{name},{COLOURS[i % len(COLOURS)]}" for i, name in enumerate(GADGETS)]
    (folder / "gadgets.csv").write_text("entity,colour\n" + "\n".join(rows) + "\n")
    (folder / "gadgets.templates.json").write_text(json.dumps(GADGET_TEMPLATES, indent=2))


@pytest.fixture(scope="module")
def analysed(real_model, tmp_path_factory):
    """A random TopK SAE (576 features) on layer 4's MLP output of SmolLM2, saved and analysed over 24 real
    sequences."""
    root = tmp_path_factory.mktemp("user-entities")
    sae = build_sae(SAEShape(576, 576), TopKConfig(k=32), Provenance("smollm2-135m", "blocks.4.hook_mlp_out"), seed=0)
    folder = root / "saes" / "random"
    save_sae(sae, folder, metadata={"context_size": 64, "prepend_bos": False})
    toks = corpus.tokenize_sequences(corpus.iter_documents("embedded"), real_model.tokenizer, 64, max_sequences=24)
    run_analysis(real_model, folder, store_in(folder), {"train": toks, "held_out": toks[:0]},
                 AnalyzeConfig(batch_size=12, sequences=24), progress=False)
    write_entity_files(root / "entities")
    return root, folder


def config(root, **overrides) -> LabelConfig:
    """Small budgets; the default tag thresholds (10 instruments of a family are known, so 5 positives)."""
    base = dict(entities=str(root / "entities"), min_positives=5, causal_tags=2, causal_prompts=4, causal_controls=2,
                probe_steps=30)
    return LabelConfig(**{**base, **overrides})


@pytest.mark.real
def test_a_user_entity_type_is_labeled_end_to_end(real_model, analysed):
    root, folder = analysed
    lines: list[str] = []
    outcome = run_label(real_model, folder, store_in(folder), config(root), log=lines.append)
    result = outcome.result
    family = next(a for a in result.attributes if a.name == "instrument.family")
    assert family.skipped is None and family.n_known >= 15 and len(family.values) >= 2, family
    # the gadgets: one line names the entity type and says why nothing was labeled
    gadget = [line for line in lines if "gadget" in line and "warning" in line]
    assert len(gadget) == 1 and "knowledge filter" in gadget[0] and "colour" in gadget[0], lines
    colour = next(a for a in result.attributes if a.name == "gadget.colour")
    assert colour.skipped and "knowledge filter" in colour.skipped
    report = write_report(root / "reports" / "random", outcome)
    text = report.read_text()
    assert "instrument.family" in text and "gadget.colour" in text
    data = json.loads((report.parent / "label.json").read_text())
    assert data["meta"]["entity_types"] == ["gadget", "instrument"] and data["wordnet"] is True
    with FeatureStore.open(store_in(folder)) as store:
        tags = store.find_tags(entity_type="instrument", limit=None)
        assert tags and {t.attribute for t in tags} == {"family"}
        assert {t.value for t in tags} <= set(FAMILIES)
        probes = store.probes("instrument", "family")
        assert {(p.kind, p.method) for p in probes} >= {("feature", "full"), ("feature", "1-sparse"),
                                                         ("neuron", "1-sparse")}
        assert all(p.details["accuracy_ci"][0] <= p.accuracy <= p.details["accuracy_ci"][1] for p in probes)
        assert store.probes("gadget") == [] and store.find_tags(entity_type="gadget") == []
        assert len(store.semantics("feature")) == 576 and len(store.semantics("neuron")) == 1536
    tested = [c for c in result.causal if c.p is not None]
    assert tested and all(c.p_holm >= c.p and c.effect_ci[0] <= c.effect <= c.effect_ci[1] for c in tested)


@pytest.mark.real
def test_nothing_known_still_writes_the_report(real_model, analysed):
    """Only the unknown entity type: nothing is scored, one line says why, and the report says so too."""
    root, folder = analysed
    lines: list[str] = []
    outcome = run_label(real_model, folder, store_in(folder), config(root, entity_types=["gadget"], semantics=False),
                        log=lines.append)
    assert [a.skipped is not None for a in outcome.result.attributes] == [True]
    assert outcome.result.tags == [] and outcome.result.probes == [] and outcome.result.causal == []
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and "gadget" in warnings[0] and "knowledge filter" in warnings[0]
    report = write_report(root / "reports" / "unknown", outcome)
    text = report.read_text()
    assert "gadget.colour" in text and "knowledge filter" in text and "## Headline" in text
    data = json.loads((report.parent / "label.json").read_text())
    assert data["headline"]["feature"]["tags"] == 0 and data["headline"]["feature"]["attributes"] == 0
    assert torch.isfinite(torch.tensor(outcome.result.timings["total"]))
