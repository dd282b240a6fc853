"""Monosemanticity scores: lexical rules, concept base rates, entity mentions, the score and classes on constructed
examples with a known answer, WordNet lexnames when installed, and scoring a real (tiny) feature store."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from features.labeling.entities import AttributeTemplates, EntitySet
from features.labeling.semantics import (
    MONO_THRESHOLD,
    Concepts,
    WordNet,
    concept_scores,
    entity_index,
    lexical_classes,
    score_store,
    summarise,
    to_store_rows,
    unit_semantics,
)


def test_lexical_classes():
    assert lexical_classes(" the", "x") == ["lex:function-word"]
    assert lexical_classes(" Paris", " in") == ["lex:capitalised"]
    assert "lex:-ing" in lexical_classes(" running", " was")
    assert "lex:-ly" in lexical_classes(" quickly", " ran")
    assert lexical_classes("1998", " in") == ["lex:number"]
    assert lexical_classes(",", " x") == ["lex:punctuation"]
    assert lexical_classes("\n", "x") == ["lex:whitespace"]
    assert lexical_classes("eng", " un") == ["lex:word-piece"]  # continues the previous token's word
    assert lexical_classes("ixed", " aff") == ["lex:word-piece", "lex:-ed"]  # the word it ends has the suffix
    assert lexical_classes(" cat", " a") == []  # a plain word: no class (a remainder is not a concept)


VOCAB = ["<0>", " the", " cat", " sat", " Kenya", ",", " is", " in", " Africa", "\n", " Peru"]


def toy_concepts(sequences):
    es = EntitySet("country", ["Kenya", "Peru"], {"continent": ["Africa", "South America"]},
                   {"continent": AttributeTemplates(["{entity} is in"])}, "The country {entity}")
    table = {" Kenya": [4], "Kenya": [], " Peru": [10], "Peru": []}
    ents = entity_index([es], lambda text: table.get(text, []))
    return Concepts(sequences, VOCAB, ents, wordnet=None)


def test_concepts_base_rates_and_entity_mentions():
    seqs = [[1, 2, 3, 7, 4, 5], [4, 6, 7, 8, 9, 10]]
    c = toy_concepts(seqs)
    assert c.n_tokens == 12
    assert "token:the" in c.of(0, 0) and "lex:function-word" in c.of(0, 0)
    assert {"entity:country", "country.continent=Africa"} <= set(c.of(0, 4))
    assert "country.continent=South America" in c.of(1, 5)
    assert not any(x.startswith("entity") for x in c.of(0, 2))
    assert math.isclose(c.base["entity:country"], 3 / 12) and math.isclose(c.base["token:in"], 2 / 12)


def interval(count, examples):
    return SimpleNamespace(count=count, examples=[SimpleNamespace(seq=s, pos=p, value=v) for s, p, v in examples])


def test_unit_on_one_concept_is_monosemantic_and_a_diffuse_unit_is_not():
    seqs = [[1, 2, 3, 7, 4, 5] * 4, [4, 6, 7, 8, 9, 10] * 4, [1, 2, 3, 9] * 6]
    c = toy_concepts(seqs)
    assert math.isclose(c.base["entity:country"], 1 / 6)
    # fires on every " Kenya"/" Peru" token (country entities), across its whole range
    ent_pos = [(s, p) for s in range(2) for p in range(24) if "entity:country" in c.of(s, p)]
    mono = unit_semantics("feature", 0, 200, [interval(100, [(s, p, 1.0) for s, p in ent_pos[:5]]),
                                                interval(100, [(s, p, 2.0) for s, p in ent_pos[5:10]])],
                          [], c)
    assert mono.cls == "monosemantic" and mono.score >= MONO_THRESHOLD
    assert mono.concepts[0]["concept"] == "entity:country" and mono.concepts[0]["p"] == 1.0
    assert math.isclose(mono.concepts[0]["llr"], math.log(1 / c.base["entity:country"]), abs_tol=1e-3)
    # fires on every token alike: each concept at its base rate, nothing is specific
    every = [(s, p, 1.0) for s in range(3) for p in range(24)]
    poly = unit_semantics("feature", 1, 500, [interval(500, every)], [], c)
    assert poly.cls == "polysemantic" and poly.score < 0.3
    # a clean top but a diffuse bulk is polysemantic: the whole range decides
    mixed = unit_semantics("feature", 2, 1000, [interval(990, every), interval(10, [(s, p, 5.0) for s, p in ent_pos])],
                           [SimpleNamespace(seq=s, pos=p, value=5.0) for s, p in ent_pos], c)
    assert mixed.cls == "polysemantic" and mixed.top_score >= MONO_THRESHOLD
    # too rare to judge
    rare = unit_semantics("neuron", 3, 4, [interval(4, [(0, 4, 1.0)] * 4)], [], c)
    assert rare.cls == "dead" and rare.score is None
    summary = summarise([mono, poly, mixed, rare])
    assert summary["feature"]["classes"] == {"monosemantic": 1, "polysemantic": 2}
    assert math.isclose(summary["feature"]["mono_share"], 1 / 3)
    assert summary["feature"]["mono_share_ci"] == [0.0, 1.0]  # three units: anything from none to all
    assert summary["neuron"]["mono_share"] is None
    rows = to_store_rows([mono, rare])
    assert rows[0].cls == "monosemantic" and rows[1].cls == "dead"


def test_few_examples_are_discounted():
    """Two heavy examples sharing a rare token give p = 1 but a low lower bound: not monosemantic."""
    base = {"token:x": 0.001, "token:y": 0.5}
    few = concept_scores([(("token:x",), 1.0), (("token:x",), 1.0)], base, 1e-4)
    many = concept_scores([(("token:x",), 1.0)] * 40, base, 1e-4)
    assert few[0]["p"] == many[0]["p"] == 1.0
    mixed = concept_scores([(("token:x",), 1.0)] * 6 + [(("token:y",), 1.0)] * 4, base, 1e-4)
    assert mixed[0]["concept"] == "token:x" and mixed[0]["p_low"] < mixed[0]["p"] == 0.6


def test_wordnet_lexnames():
    """WordNet's database is installed by scripts/ensure_wordnet.sh (`make run`, `make test`), so this always runs."""
    wn = WordNet.find()
    assert wn is not None, "WordNet missing: run scripts/ensure_wordnet.sh"
    try:
        assert "wn:noun.animal" in wn.lexnames("dogs") and "wn:dog.n" in wn.lexnames("dogs")
        assert "wn:noun.location" in wn.lexnames("city") or "wn:noun.group" in wn.lexnames("city")
        assert any(x.startswith("wn:verb") for x in wn.lexnames("running"))
        assert {"wn:african_country.n", "wn:country.n"} <= set(wn.lexnames("Kenya"))  # instance hypernyms too
        assert wn.lexnames("qzxv") == []
    finally:
        wn.close()


def test_a_bird_unit_gets_the_wordnet_concept_bird():
    """The issue's feature #2539 (rooster, hawks, fowl, bird): every example shares WordNet's bird (the concept
    below which all four words sit), so the unit is monosemantic and bird is its concept, where token identities
    alone made it "polysemantic"."""
    vocab = [" rooster", " hawks", " fowl", " bird", " the", " car", " ran", " blue", ",", " of", " house", " dogs"]
    filler = [4, 5, 6, 7, 8, 9, 10, 11] * 6  # " dogs": animals are commoner than birds
    sequences = [[i] + filler for i in range(4)] * 5  # each bird word 5 times among 980 tokens
    birds = [(s, 0) for s in range(20)]
    examples = [interval(50, [(s, p, 1.0 + 0.1 * k) for k, (s, p) in enumerate(birds[:10])]),
                interval(50, [(s, p, 3.0) for s, p in birds[10:]])]
    wn = WordNet.find()
    try:
        with_wn = unit_semantics("feature", 0, 100, examples, [], Concepts(sequences, vocab, wordnet=wn))
        without = unit_semantics("feature", 0, 100, examples, [], Concepts(sequences, vocab, wordnet=None))
    finally:
        wn.close()
    assert with_wn.cls == "monosemantic" and with_wn.concepts[0]["p"] == 1.0
    assert with_wn.concepts[0]["concept"] == "wn:bird.n"  # the most specific concept covering all four words
    assert without.cls == "polysemantic" and without.score < 0.5


def test_weights_count_activation_above_the_on_threshold():
    """A neuron's examples weigh by their activation above its on threshold (0 for features): just above the
    threshold counts for almost nothing, so both kinds' scores mean the same thing."""
    seqs = [[1, 2, 3, 7, 4, 5] * 4, [4, 6, 7, 8, 9, 10] * 4, [1, 2, 3, 9] * 6]
    c = toy_concepts(seqs)
    ent = [(s, p) for s in range(2) for p in range(24) if "entity:country" in c.of(s, p)][:5]
    other = [(2, p) for p in range(5)]
    ivs = [interval(100, [(s, p, 2.0) for s, p in other]), interval(100, [(s, p, 4.0) for s, p in ent])]
    as_feature = unit_semantics("neuron", 0, 200, ivs, [], c)
    as_neuron = unit_semantics("neuron", 0, 200, ivs, [], c, threshold=1.95)
    country = next(d for d in as_neuron.concepts if d["concept"] == "entity:country")
    assert country["p"] == pytest.approx(2.05 / 2.1, abs=1e-3)  # 5 x (4 - 1.95) vs 5 x (2 - 1.95)
    assert as_neuron.cls == "monosemantic" and as_feature.cls == "polysemantic"


def test_score_store_on_a_tiny_store(tmp_path, tiny_model):
    from features.analyze import AnalyzeConfig, analyze, write_analysis
    from features.store import FeatureStore
    from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

    sae = build_sae(SAEShape(32, 48), TopKConfig(k=4, encoder_bf16=False), Provenance("tiny", "blocks.1.hook_mlp_out"))
    toks = torch.randint(0, 60, (10, 16), generator=torch.Generator().manual_seed(0))
    cfg = AnalyzeConfig(batch_size=5, top_examples=4, intervals=4, interval_examples=3, window_before=3,
                        window_after=2, n_logits=3, n_related=3)
    analysis = analyze(tiny_model, sae, toks, cfg, progress=False)
    path = write_analysis(tmp_path / "features.db", analysis, vocab=[f" w{i}" for i in range(500)],
                       meta={"sae_id": "tiny"})
    with FeatureStore.open(path, writable=True) as store:
        rows, summary = score_store(store, [], None, wordnet=False, log=lambda m: None)
        assert len(rows) == 48 + 64 and summary["wordnet"] is None and summary["n_tokens"] == 160
        store.write_semantics(to_store_rows(rows), replace=True)
        for r in rows[:5]:
            got = store.semantics_for(r.kind, r.index)
            assert got.cls == r.cls and got.score == r.score
        assert store.feature(0).semantics is not None
