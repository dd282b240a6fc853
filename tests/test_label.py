"""Labeler tests: scores on constructed activations with known answers, probes on separable data, the whole
labeler on a tiny model with a planted feature, bad inputs, and one real-model run on a few countries."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from features import cli
from features.labeling import (
    AttributeTemplates,
    EntitySet,
    LabelConfig,
    LabelOutcome,
    label,
    load_entities,
    run_label,
    save_entity_set,
)
from features.labeling.activations import span_activations
from features.labeling.directions_stats import HEADLINE_KEYS
from features.labeling.probes import Split, full_probe, sparse_probes, split_train_test, stable_hash
from features.labeling.prompts import Encoded, encode_prompt, length_batches
from features.labeling.scoring import (
    TAG_RESAMPLES,
    auroc,
    best_f1_scores,
    centered_ci,
    firing_scores,
    select_tags,
    tag_count_ci,
    tag_counter,
)
from features.labeling.timing import Timer
from features.layout import store_in
from features.report import render_markdown, write_report
from features.run_config import config_from_dict
from sae.errors import SaekitError
from sae.formats import save_sae
from sae.hooks import editing
from sae.saes import Provenance, SAEShape, TopKConfig, build_sae

HOOK = "blocks.1.hook_mlp_out"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny workloads: one thread is faster here


# ---------------------------------------------------------------------------------------------
# Scores on constructed activations


def onehot(labels: list[int], n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), n)


def test_unit_firing_exactly_on_positives_scores_one():
    labels = [0] * 12 + [1] * 20 + [2] * 8
    y = onehot(labels, 3)
    exact = torch.tensor([1.0 if c == 0 else 0.0 for c in labels]) * torch.linspace(1, 2, len(labels))
    always = torch.ones(len(labels))
    never = torch.zeros(len(labels))
    half = torch.tensor([1.0 if (c == 0 and i % 2) else 0.0 for i, c in enumerate(labels)])
    sc = firing_scores(torch.stack([exact, always, never, half]), y)
    assert sc.support.tolist() == [12, 20, 8]
    assert (sc.precision[0, 0], sc.recall[0, 0], sc.f1[0, 0], sc.auroc[0, 0]) == (1, 1, 1, 1)
    assert sc.auroc[0, 1] < 0.5 and sc.f1[0, 1] == 0
    assert math.isclose(sc.precision[1, 1], 0.5) and sc.recall[1, 1] == 1 and sc.auroc[1, 1] == 0.5
    assert sc.f1[2].tolist() == [0, 0, 0] and sc.auroc[2].tolist() == [0.5] * 3
    assert sc.precision[3, 0] == 1 and math.isclose(sc.recall[3, 0], 0.5)
    # tags: only the exact unit, only for its value; a support below min_positives blocks the tag
    assert select_tags(sc, 0.6, 0.85, 10) == [(0, 0)]
    assert select_tags(sc, 0.6, 0.85, 13) == []


def test_auroc_with_ties_matches_pairwise_counting():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 30), generator=gen).float()  # many ties
    labels = torch.randint(0, 3, (30,), generator=gen).tolist()
    y = onehot(labels, 3)
    got = auroc(a, y)
    for u, v in itertools.product(range(5), range(3)):
        pos = [a[u, i] for i in range(30) if labels[i] == v]
        neg = [a[u, i] for i in range(30) if labels[i] != v]
        want = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
        assert math.isclose(float(got[u, v]), float(want), abs_tol=1e-5)


def test_best_f1_threshold_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(7, 25, generator=gen).round(decimals=1)  # some ties
    labels = torch.randint(0, 3, (25,), generator=gen).tolist()
    y = onehot(labels, 3)
    sc = best_f1_scores(a, y, chunk=3)
    for u, v in itertools.product(range(7), range(3)):
        best = 0.0
        for t in sorted(set(a[u].tolist())) + [float(a[u].min()) - 1]:
            on = a[u] > t
            tp = sum(bool(on[i]) and labels[i] == v for i in range(25))
            best = max(best, 2 * tp / (int(on.sum()) + labels.count(v)))
        assert math.isclose(float(sc.f1[u, v]), best, abs_tol=1e-5)
        # the reported threshold reproduces the reported F1
        on = a[u] > sc.threshold[u, v]
        tp = sum(bool(on[i]) and labels[i] == v for i in range(25))
        assert math.isclose(2 * tp / (int(on.sum()) + labels.count(v)), float(sc.f1[u, v]), abs_tol=1e-5)


@pytest.mark.parametrize("rule", ["best_f1", "fires"])
def test_tag_counter_rescoring_a_resample_matches_brute_force(rule):
    """A bootstrap resample scored as entity weights gives the F1, AUROC and support of scoring the resampled
    (duplicated) entities from scratch, for every candidate pair, and on all entities it counts the tags."""
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (40,), generator=gen)
    a = torch.randn(30, 40, generator=gen).round(decimals=1)  # ties
    a[:10] += 2 * (labels == torch.arange(10)[:, None] % 3)  # units 0..9 mark a value
    thresholds = torch.rand(30, generator=gen) if rule == "fires" else None

    def scores(acts, lab):
        y = onehot(lab.tolist(), 3)
        return best_f1_scores(acts, y) if thresholds is None else firing_scores(acts, y, thresholds)

    sc = scores(a, labels)
    counter = tag_counter(a, labels, sc, thresholds, (0.6, 0.85, 5))
    assert 10 <= len(counter.pairs) < 90 and counter(np.arange(40)) == len(select_tags(sc, 0.6, 0.85, 5))
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, 40, 40)
        brute = scores(a[:, idx], labels[idx])
        ok = (brute.f1 >= 0.6 - 1e-6) & (brute.auroc >= 0.85 - 1e-6) & (brute.support >= 5)[None]
        got = counter.weighted(torch.bincount(torch.as_tensor(idx), minlength=40).float())
        assert got.tolist() == ok[counter.pairs[:, 0], counter.pairs[:, 1]].tolist()
    ci = tag_count_ci(counter)
    assert ci.lo <= ci.value == counter(np.arange(40)) <= ci.hi and ci.lo < ci.hi


def test_centered_interval_sits_around_a_count_its_resamples_overshoot():
    """Resamples repeat entities; a count that grows with repeats (here: repeated entities, as units crossing a
    threshold do) has a percentile interval above the count itself, so the count gets the spread around it."""
    from features.labeling.significance import paired_bootstrap_ci

    def repeats(parts):
        return float(5 + len(parts[0]) - len(np.unique(parts[0])))

    groups = [np.arange(40)]
    plain = paired_bootstrap_ci(groups, repeats, resamples=TAG_RESAMPLES)
    got = centered_ci(groups, repeats)
    assert plain.value == got.value == 5 and plain.lo > 5  # the percentile interval misses the count
    assert got.lo <= 5 <= got.hi and got.hi - got.lo == pytest.approx(plain.hi - plain.lo)
    assert centered_ci(groups, lambda parts: 0.0).as_list() == [0.0, 0.0]


def test_probes_on_separable_data():
    gen = torch.Generator().manual_seed(2)
    n, d = 120, 20
    y = torch.arange(n) % 3
    x = torch.randn(n, d, generator=gen) * 0.3
    x[:, 5] += 4 * (y == 1)  # unit 5 marks class 1, unit 11 class 2: together they separate all three
    x[:, 11] += 4 * (y == 2)
    names = [f"e{i}" for i in range(n)]
    train, test = split_train_test(names, y, 0.25)
    assert split_train_test(names, y, 0.25)[1].tolist() == test.tolist()  # deterministic
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == n
    assert torch.bincount(y[test]).tolist() == [10, 10, 10]  # stratified
    full = full_probe(x, y, Split(train, test), 3)
    assert full.accuracy == 1.0
    one, k = sparse_probes(x, y, Split(train, test), 3, k=2)
    assert one.units[0] in (5, 11) and 0.6 <= one.accuracy < 0.9  # one unit tells apart one class from two
    assert sorted(k.units) == [5, 11] and k.accuracy == 1.0


# ---------------------------------------------------------------------------------------------
# The labeler on a tiny model


WORDS = ["<|endoftext|>", "[UNK]", "The", "thing", "Fact:", "is", "coloured", "shaped", "red", "blue", "round"]


def word_tokenizer(entities: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS + entities)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def entity_set(n: int = 24) -> EntitySet:
    names = [f"ent{i}" for i in range(n)]
    return EntitySet(
        entity_type="thing", entities=names,
        attributes={"colour": ["red" if i % 2 else "blue" for i in range(n)], "shape": ["round"] * n},
        # attribute prompts start with the context prompt, so the entity token's activations are the same in both
        templates={"colour": AttributeTemplates(["The thing {entity} is coloured"]),
                   "shape": AttributeTemplates(["The thing {entity} is shaped"])},
        context_template="The thing {entity}")


def tiny_sae(d_in: int = 32, d_sae: int = 64, k: int = 4, hook: str = HOOK, model: str = "tiny"):
    return build_sae(SAEShape(d_in, d_sae), TopKConfig(k=k, encoder_bf16=False), Provenance(model, hook), seed=0)


def tiny_label_sae(tiny_model, es, tok):
    """A tiny TopK SAE whose feature 0 fires on exactly the red things (planted by least squares)."""
    sae = tiny_sae()
    prompts = [encode_prompt(tok, es.context_template, e, 0) for e in es.entities]
    x = torch.stack([s[-1] for s in span_activations(tiny_model, prompts, [HOOK], 8, Timer())[HOOK]])
    target = torch.tensor([1.0 if v == "red" else -1.0 for v in es.attributes["colour"]])
    w = torch.linalg.lstsq(x, target[:, None]).solution[:, 0]
    with torch.no_grad():
        sae.W_enc[:, 0] = 50 * w
        sae.b_enc[0] = 0.0
    return sae


@pytest.fixture(scope="module")
def tiny_case(tiny_model):
    es = entity_set()
    tok = word_tokenizer(es.entities)
    sae = tiny_label_sae(tiny_model, es, tok)
    cfg = LabelConfig(knowledge_filter=False, min_positives=10, causal_tags=2, causal_prompts=4, causal_controls=3,
                      probe_steps=50, batch_size=8)
    logs: list[str] = []
    result = label(tiny_model, sae, [es], cfg, tokenizer=tok, log=logs.append)
    # 4 prompts give p >= 2^-4 = 0.0625: Holm over the tested tags can never call one causal, and the log says so
    assert any("no tag can be called causal; raise label.causal_prompts" in m for m in logs)
    assert not any(c.status == "causal" for c in result.causal)
    return es, tok, sae, cfg, result


def test_encode_prompt_finds_the_entity_tokens():
    tok = word_tokenizer(["ent0"])
    enc = encode_prompt(tok, "Fact: The thing {entity} is coloured", "ent0", 0)
    assert enc.ids[0] == 0 and enc.ids[enc.span[0]:enc.span[1]] == tok("ent0")["input_ids"]
    short = Encoded([0], (0, 1))
    assert list(length_batches([enc, short, enc], 2)) == [[1, 0], [2]]  # by length, then index


def test_label_tags_the_planted_feature(tiny_case):
    es, _, _, cfg, result = tiny_case
    planted = [t for t in result.tags if t.kind == "feature" and t.index == 0]
    assert [(t.attribute, t.value) for t in planted] == [("colour", "red")]
    t = planted[0]
    assert (t.precision, t.recall, t.f1, t.auroc, t.support) == (1.0, 1.0, 1.0, 1.0, 12)
    assert sorted(t.entities) == sorted(e for e, v in zip(es.entities, es.attributes["colour"], strict=True)
                                    if v == "red")
    for tag in result.tags:  # every tag clears every threshold
        assert tag.f1 >= cfg.min_f1 and tag.auroc >= cfg.min_auroc and tag.support >= cfg.min_positives
    # the single-valued attribute is skipped with its reason, not an error
    shape = next(a for a in result.attributes if a.attribute == "shape")
    assert shape.skipped and "1 distinct value" in shape.skipped
    colour = next(a for a in result.attributes if a.attribute == "colour")
    assert colour.kept_fraction == 1.0 and colour.values == [("blue", 12), ("red", 12)]


def test_label_probes_and_causal_checks(tiny_case):
    _, _, _, cfg, result = tiny_case
    methods = {(p.kind, p.method) for p in result.probes}
    assert methods == {("feature", "full"), ("feature", "1-sparse"), ("feature", "8-sparse"),
                       ("neuron", "1-sparse"), ("neuron", "8-sparse")}
    feat1 = next(p for p in result.probes if (p.kind, p.method) == ("feature", "1-sparse"))
    assert feat1.accuracy == 1.0 and feat1.details["units"] == [0]  # the planted feature alone separates
    assert all(0 <= p.accuracy <= 1 and p.n_test > 0 for p in result.probes)
    for p in result.probes:  # each accuracy with its interval over the held-out entities
        lo, hi = p.details["accuracy_ci"]
        assert lo <= p.accuracy <= hi and len(p.details["test_correct"]) == p.n_test
        assert sum(p.details["test_correct"]) == round(p.accuracy * p.n_test)
    checked = [c for c in result.causal if c.kind == "feature" and c.index == 0]
    assert len(checked) == 1 and checked[0].n_prompts == 4 and checked[0].drop is not None
    c = checked[0]
    assert len(c.diffs) == 4 and len(c.control_drops) == cfg.causal_controls
    assert c.effect == pytest.approx(sum(c.diffs) / 4) and c.effect == pytest.approx(c.drop - c.control_mean)
    assert c.effect_ci[0] <= c.effect <= c.effect_ci[1] and c.p >= 1 / 16  # 4 prompts: p is at least 2^-4
    assert c.p_holm >= c.p and c.status == "correlational only"  # too few prompts to be significant
    tag = next(t for t in result.tags if t.kind == "feature" and t.index == 0)
    assert tag.causal_effect == c.effect and tag.causal_status == c.status and tag.causal_p == c.p_holm
    assert tag.causal_ci == tuple(c.effect_ci)
    assert all(x != 0 for x in c.control_drops)  # controls off at the entity are ablated value-matched, not zero
    # tag counts carry their interval over entities
    colour = next(a for a in result.attributes if a.attribute == "colour")
    for kind in ("feature", "neuron"):
        lo, hi = colour.n_tags_ci[kind]
        assert lo <= colour.n_tags[kind] <= hi
        assert result.cis["tags"][kind][0] <= sum(t.kind == kind for t in result.tags) <= result.cis["tags"][kind][1]
    assert result.timings["forward"] > 0 and result.timings["total"] >= result.timings["forward"]


def test_causal_verdicts_are_a_holm_corrected_test_over_prompts():
    """Per-prompt differences -> effect, CI and sign-flip p; Holm across all tags; "causal" needs both the corrected
    p and the minimum effect, with no floor on any spread."""
    from features.labeling.causal import ALPHA, paired_effect, verdicts
    from features.labeling.results import CausalResult

    def result(unit, controls):
        r = CausalResult("feature", 0, "thing", "colour", "red", len(unit))
        paired_effect(r, unit, controls, seed=0)
        return r

    strong = result([0.5] * 16, [[0.0, 0.02]] * 16)  # every prompt: the unit's drop beats the controls'
    small = result([0.06] * 16, [[0.0, 0.0]] * 16)  # as consistent, but below the minimum effect
    mixed = result([0.5, -0.5] * 8, [[0.0, 0.0]] * 16)  # no consistent sign
    few = result([0.5] * 4, [[0.0, 0.0]] * 4)  # consistent, but 4 prompts cannot reach p < 0.05 / 4
    assert strong.effect == pytest.approx(0.49) and strong.control_mean == pytest.approx(0.01)
    assert strong.p == pytest.approx(2 ** -16) and strong.effect_ci == pytest.approx([0.49, 0.49])
    assert strong.control_drops == pytest.approx([0.0, 0.02]) and len(strong.diffs) == 16
    verdicts([strong, small, mixed, few], min_effect=0.1)
    assert strong.p_holm == pytest.approx(4 * 2 ** -16) and strong.status == "causal"
    assert small.p_holm < ALPHA and small.status == "correlational only"
    assert mixed.p > 0.4 and mixed.status == "correlational only"
    assert few.p == pytest.approx(1 / 16) and few.status == "correlational only"


def test_controls_off_on_a_prompt_get_a_value_matched_ablation():
    """A control that is off at the prompt's entity tokens is not a free zero drop: it is ablated by the tagged
    unit's activation, rescaled to the control's typical activation, along its own direction."""
    from features.labeling.causal import Candidate, _patches, _Site
    from features.labeling.results import AttributeReport, UnitOn

    attr = SimpleNamespace(report=AttributeReport("thing", "colour", 4, 2))
    acts = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.5, 0.0]])  # [span, units] at the entity's two tokens
    on = UnitOn(torch.full((3,), 0.1), torch.tensor([4.0, 1.0, 2.0]), torch.zeros(3))
    W_dec = torch.eye(3, 5)
    site = _Site(Candidate("feature", 0, attr, 0, 1.0, 0.5), {7: acts}, [7], on, "hook", 5, W_dec)
    patches, owners = _patches(site, [1, 2], None)
    assert [o[0] for o in owners] == ["clean", "unit", "control", "control"]
    assert torch.equal(patches[1].delta, -acts[:, 0:1] * W_dec[0])  # the unit's own contribution
    assert torch.equal(patches[2].delta, -acts[:, 1:2] * W_dec[1])  # control 1 is on: its own contribution
    assert torch.allclose(patches[3].delta, -acts[:, 0:1] * (2.0 / 4.0) * W_dec[2])  # control 2 is off


def test_ablating_the_planted_feature_matches_a_manual_forward(tiny_case, tiny_model):
    """The causal drop equals the log-prob change of a plain hooked forward that subtracts act x decoder row."""
    es, tok, sae, cfg, result = tiny_case
    res = next(c for c in result.causal if c.kind == "feature" and c.index == 0)
    reds = sorted((e for e, v in zip(es.entities, es.attributes["colour"], strict=True)
                                    if v == "red"), key=stable_hash)[:4]
    answer = tok(" red", add_special_tokens=False)["input_ids"][0]
    drops = []
    for e in reds:
        enc = encode_prompt(tok, es.templates["colour"].templates[0], e, 0)
        toks = torch.tensor([enc.ids])
        a, b = enc.span

        def ablate(act, a=a, b=b):
            f = sae.encode(act[0, a:b])[:, 0]
            act[0, a:b] -= f[:, None] * sae.W_dec[0]
            return act

        with torch.no_grad():
            clean = tiny_model(toks)[0, -1].log_softmax(-1)[answer]
            with editing(tiny_model, [(HOOK, ablate)]):
                ablated = tiny_model(toks)[0, -1].log_softmax(-1)[answer]
        drops.append(float(clean - ablated))
    assert math.isclose(res.drop, sum(drops) / len(drops), abs_tol=1e-4)


def test_max_pooling_over_entity_tokens(tiny_model):
    """Two-token entities: `pooling: max` takes each unit's max over both tokens, `last` the last token."""
    es = entity_set(24)
    es.entities = [f"{e} ent{(i + 1) % 24}" for i, e in enumerate(es.entities)]
    tok = word_tokenizer([f"ent{i}" for i in range(24)])
    prompts = [encode_prompt(tok, es.context_template, e, 0) for e in es.entities]
    assert all(p.span[1] - p.span[0] == 2 and p.span[1] == len(p.ids) for p in prompts)
    sae = tiny_label_sae(tiny_model, es, tok)
    spans = span_activations(tiny_model, prompts, [HOOK, "blocks.1.mlp.hook_post"], 8, Timer())
    for pooling, pool in (("max", lambda t: t.max(0).values), ("last", lambda t: t[-1])):
        cfg = LabelConfig(knowledge_filter=False, pooling=pooling, causal_tags=0, probe_steps=30, batch_size=8)
        result = label(tiny_model, sae, [es], cfg, tokenizer=tok, log=lambda m: None)
        data = result.data["thing"]
        with torch.no_grad():
            want = torch.stack([pool(sae.encode(s)) for s in spans[HOOK]])
        assert torch.allclose(data["feature"], want, atol=1e-4)
        want = torch.stack([pool(s) for s in spans["blocks.1.mlp.hook_post"]])
        assert torch.allclose(data["neuron"], want, atol=1e-5)
        assert data["names"] == es.entities


def test_knowledge_filter_skips_an_attribute_the_model_does_not_know(tiny_model):
    names = [f"ent{i}" for i in range(30)]
    colours = ["red", "blue", "round", "shaped", "coloured"]
    es = EntitySet("thing", names, {"colour": [colours[i % 5] for i in range(30)]},
                   {"colour": AttributeTemplates(["Fact: The thing {entity} is coloured"])}, "The thing {entity}")
    tok = word_tokenizer(names)
    sae = tiny_sae()
    result = label(tiny_model, sae, [es], LabelConfig(causal_tags=0, batch_size=16), tokenizer=tok,
                   log=lambda m: None)
    (rep,) = result.attributes
    # a random model ranks one first-token first for nearly everything: at most one value keeps 5 entities
    assert rep.skipped and "knowledge filter" in rep.skipped
    assert rep.kept_fraction is not None and rep.kept_fraction < 0.5
    assert result.tags == [] and result.probes == []
    md = render_markdown(result, None, {"sae_id": "tiny"}, {})
    assert "thing.colour" in md and "knowledge filter" in md


# ---------------------------------------------------------------------------------------------
# Store, report, bad input


def make_run(tmp_path, tiny_model, analyse: bool = True):
    """A saved tiny SAE, its entity files, a label config and, if `analyse`, the SAE's feature store."""
    from features.analyze import AnalyzeConfig, run_analysis

    cfg = LabelConfig(entities=str(tmp_path / "ents"), knowledge_filter=False, causal_tags=1, causal_prompts=2,
                      causal_controls=2, probe_steps=30)
    es = entity_set()
    save_entity_set(es, tmp_path / "ents")
    folder = tmp_path / "saes" / "tiny-sae"
    save_sae(tiny_label_sae(tiny_model, es, word_tokenizer(es.entities)), folder,
             metadata={"context_size": 16, "prepend_bos": False})
    if analyse:
        toks = torch.randint(0, 40, (32, 16), generator=torch.Generator().manual_seed(3))
        run_analysis(tiny_model, folder, store_in(folder), {"train": toks, "held_out": toks[:0]},
                     AnalyzeConfig(batch_size=8, sequences=32, top_examples=4, intervals=4, interval_examples=3),
                     progress=False)
    return cfg, folder, es


def test_run_label_writes_store_and_report(tmp_path, tiny_model):
    from features.store import FeatureStore

    cfg, folder, es = make_run(tmp_path, tiny_model)
    tiny_model.tokenizer = word_tokenizer(es.entities)
    try:
        outcome = run_label(tiny_model, folder, store_in(folder), cfg, log=lambda m: None)
    finally:
        tiny_model.tokenizer = None
    result, semantics, meta = outcome
    assert meta["sae_id"] == "tiny-sae" and meta["store"] == str(store_in(folder))
    report = write_report(tmp_path / "reports" / "tiny-sae", outcome)
    assert report == tmp_path / "reports" / "tiny-sae" / "label.md"
    text = report.read_text()
    for section in ("## Headline", "## Knowledge filter", "## Probes", "## Causal checks", "## Attributes skipped",
                    "## Monosemanticity", "thing.shape"):
        assert section in text
    for png in ("label-semantics.png", "label-probes.png", "label-causal.png", "label-knowledge.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((report.parent / "label.json").read_text())
    assert data["n_tags"]["feature"] == sum(t.kind == "feature" for t in result.tags)
    assert data["wordnet"] is (semantics["wordnet"] is not None)
    assert "reports/run/label.json" in data["directions"]  # where the null cause fraction is filled
    for kind in ("feature", "neuron"):
        h = data["headline"][kind]
        assert h["monosemantic_share"] == h["mono_share"] == semantics[kind]["mono_share"]
        lo, hi = h["monosemantic_share_ci"]
        assert lo <= h["monosemantic_share"] <= hi
        for key in ("tags", "attributes_tagged", "probe_1", "probe_k"):
            assert h[f"{key}_ci"][0] <= h[key] <= h[f"{key}_ci"][1], key
        assert set(HEADLINE_KEYS) <= set(h)  # the keys every label.json headline carries
        assert h["attributes_scored"] == h["attributes"] == sum(not a.skipped for a in result.attributes)
        causal = {(c.entity_type, c.attribute) for c in result.causal if c.kind == kind and c.status == "causal"}
        assert h["attributes_causal"] == len(causal) and h["cause_fraction"] is None  # run-level, across layers
    assert "Holm p" in text and "[" in text.split("## Headline")[1].split("##")[0]
    with FeatureStore.open(store_in(folder)) as store:
        tags = store.find_tags(kind="feature", index=0)
        assert [(t.attribute, t.value, t.f1) for t in tags] == [("colour", "red", 1.0)]
        assert tags[0].causal_status in ("causal", "correlational only")
        assert len(store.probes("thing", "colour")) == 5
        sem = store.semantics("feature") + store.semantics("neuron")
        assert len(sem) == 64 + 64 and {s.cls for s in sem} <= {"monosemantic", "polysemantic", "dead"}
    # a report can be rewritten from the result alone (no plots)
    again = LabelOutcome(result, semantics, {"sae_id": "x"})
    assert write_report(tmp_path / "again", again, plots=False).is_file()


def test_label_applies_the_stores_on_rule(tmp_path, tiny_model):
    """With the store's unit statistics, `feature_on: fires` tags a unit above its own on threshold from the
    analysis pass, features (0) and neurons (their matched quantile) alike, and the causal controls are matched on
    the store's frequencies."""
    from features.store import FeatureStore

    cfg, folder, es = make_run(tmp_path, tiny_model)
    cfg.feature_on, cfg.min_f1, cfg.min_auroc, cfg.causal_tags = "fires", 0.5, 0.6, 0
    with FeatureStore.open(store_in(folder)) as store:
        stats = store.unit_stats()
    sae = tiny_label_sae(tiny_model, es, word_tokenizer(es.entities))
    result = label(tiny_model, sae, [es], cfg, tokenizer=word_tokenizer(es.entities), stats=stats,
                   log=lambda m: None)
    assert result.settings["on_thresholds_from"] == "feature store"
    acts = result.data["thing"]
    by_kind = {k: torch.tensor(stats[k].threshold) for k in ("feature", "neuron")}
    assert bool((by_kind["neuron"] > 0).all())
    for t in result.tags:  # a tag's entities are exactly the value's entities above the unit's store threshold
        names = acts["names"]
        on = acts[t.kind][:, t.index] > by_kind[t.kind][t.index]
        want = {n for n, o, v in zip(names, on.tolist(), es.attributes["colour"], strict=True) if o and v == t.value}
        assert set(t.entities) == want
    assert any(t.kind == "neuron" for t in result.tags) and any(t.kind == "feature" for t in result.tags)


def test_store_without_analysis_pass_says_run_analyze(tmp_path, tiny_model):
    cfg, folder, _ = make_run(tmp_path, tiny_model, analyse=False)
    with pytest.raises(SaekitError, match="run `saekit analyze --config"):
        run_label(tiny_model, folder, store_in(folder), cfg, log=lambda m: None)


def write_files(folder, csv_text: str, templates: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thing.csv").write_text(csv_text)
    (folder / "thing.templates.json").write_text(json.dumps(templates, indent=2))


GOOD_TEMPLATES = {"entity_type": "thing", "context_template": "The thing {entity}",
                  "attributes": {"colour": {"templates": ["Fact: The thing {entity} is coloured"]}}}


@pytest.mark.parametrize("case", ["missing column", "empty value", "no placeholder"])
def test_bad_entity_files_name_file_line_and_problem(tmp_path, capsys, case):
    folder = tmp_path / "ents"
    if case == "missing column":
        two = json.loads(json.dumps(GOOD_TEMPLATES))
        two["attributes"]["size"] = {"templates": ["The thing {entity} is"]}
        write_files(folder, "entity,size\nent0,big\nent1,small\n", two)
        want = [r"thing\.templates\.json, line \d+", "has no 'colour' column"]
    elif case == "empty value":
        write_files(folder, "entity,colour\nent0,red\nent1,\n", GOOD_TEMPLATES)
        want = [r"thing\.csv, line 3", "empty value in column 'colour'"]
    else:
        bad = json.loads(json.dumps(GOOD_TEMPLATES))
        bad["attributes"]["colour"]["templates"] = ["Fact: The thing is coloured"]
        write_files(folder, "entity,colour\nent0,red\n", bad)
        want = [r"thing\.templates\.json, line 7", r"has no \{entity\}"]
    for pattern in want:
        with pytest.raises(SaekitError, match=pattern):
            load_entities(LabelConfig(entities=str(folder)))
    # through the command line: one error line, exit status 2, before any model is loaded
    config = tmp_path / "c.yaml"
    config.write_text(f"name: bad\nruns_dir: {tmp_path}/runs\nmodel: {{name: does-not-exist}}\n"
                      f"label: {{entities: {folder}}}\n")
    assert cli.main(["label", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit: error: ") and str(folder / "thing") in err and err.count("\n") == 1


def test_unknown_entity_type_is_named(tmp_path):
    save_entity_set(entity_set(), tmp_path)
    with pytest.raises(SaekitError, match="label.entity_types names planet"):
        load_entities(LabelConfig(entities=str(tmp_path), entity_types=["planet"]))


def test_label_config_is_validated():
    with pytest.raises(SaekitError, match="label.min_f1"):
        config_from_dict({"label": {"min_f1": 1.5}}, "test")
    with pytest.raises(SaekitError, match="label.pooling"):
        config_from_dict({"label": {"pooling": "mean"}}, "test")
    with pytest.raises(SaekitError, match="label.max_entities"):
        config_from_dict({"label": {"max_entities": 0}}, "test")
    for bad, key in (({"min_auroc": -0.1}, "label.min_auroc"), ({"test_fraction": 1.0}, "label.test_fraction"),
                     ({"min_class_size": 1}, "label.min_class_size"), ({"causal_tags": -1}, "label.causal_tags")):
        with pytest.raises(SaekitError, match=key):
            LabelConfig(**bad)


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_real_model_knows_continents_and_probes_read_them(real_model):
    """SmolLM2 on 48 countries: the filter keeps most, the full probe beats the majority baseline, and the
    labeler's mechanics hold on real activations (random SAE: tags are not expected)."""
    es = next(s for s in load_entities(LabelConfig(entity_types=["country"])))
    sae = tiny_sae(576, 512, 16, "blocks.4.hook_mlp_out", real_model.cfg.model_name)
    cfg = LabelConfig(max_entities=48, causal_tags=1, causal_prompts=3, causal_controls=2, probe_steps=50,
                      min_positives=5, min_f1=0.3, min_auroc=0.7)
    result = label(real_model, sae, [es], cfg, log=lambda m: None)
    cont = next(a for a in result.attributes if a.attribute == "continent")
    capital = next(a for a in result.attributes if a.attribute == "capital")
    assert capital.skipped  # one country per capital: nothing to score
    assert cont.skipped is None and cont.kept_fraction >= 0.6, cont
    full = next(p for p in result.probes if p.method == "full")
    assert full.accuracy > full.baseline
    assert result.timings["forward"] / result.timings["total"] > 0.5
    for c in result.causal:
        assert c.drop is None or math.isfinite(c.drop)


@pytest.mark.parametrize("feature_on", ["best_f1", "fires"])
def test_feature_on_rule(tiny_model, feature_on):
    """A feature on for every entity but twice as strong on the red ones: its best-F1 threshold separates the
    colours (tagged); "fires" sees it on everywhere (precision 0.5, F1 0.67 < 0.7: not tagged)."""
    es = entity_set()
    tok = word_tokenizer(es.entities)
    sae = tiny_label_sae(tiny_model, es, tok)
    with torch.no_grad():
        sae.W_enc[:, 1] = sae.W_enc[:, 0]
        sae.b_enc[1] = 100.0  # pre-activation ~150 on red, ~50 on blue: always among the top k, always > 0
    cfg = LabelConfig(knowledge_filter=False, min_positives=10, min_f1=0.7, causal_tags=0, probe_steps=20,
                      batch_size=8, feature_on=feature_on)
    result = label(tiny_model, sae, [es], cfg, tokenizer=tok, log=lambda m: None, neurons=False)
    tagged = {(t.index, t.value) for t in result.tags if t.kind == "feature"}
    assert (0, "red") in tagged
    assert ((1, "red") in tagged) == (feature_on == "best_f1")
