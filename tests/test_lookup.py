"""Lookup by layer: the direction split on hand-made streams, the probe against the labeler's full probe, the whole
measurement on a tiny model with a planted attribute, the written report and its viewer page, and the real model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from streamlit.testing.v1 import AppTest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from features.labeling import AttributeTemplates, EntitySet, LabelConfig, load_entities
from features.labeling.lookup import (
    LOOKUP_JSON,
    LOOKUP_MD,
    LOOKUP_PNG,
    LookupConfig,
    _Run,
    _states,
    direction_projections,
    lookup_by_layer,
    probe_hits,
    write_lookup,
)
from features.labeling.probes import full_probe, split_train_test
from features.labeling.timing import Timer
from sae.errors import SaekitError
from sae.hooks import run_to

COLOURS = ["red", "blue", "green"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny workloads: one thread is faster here


# ---------------------------------------------------------------------------------------------
# Measures on constructed activations


def test_direction_split_is_exact_on_an_additive_stream():
    """A constant embedding plus an attribute signal written in two parts (a quarter and three quarters): the
    shares are exactly 0, 0.25 and 0.75 on any split, and the parts add up to the total entity by entity."""
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 6
    y = torch.arange(n) % 2
    signal = torch.randn(2, d, generator=gen)[y] + 0.3 * torch.randn(n, d, generator=gen)
    parts = torch.stack([torch.ones(n, d) * 5, 0.25 * signal, 0.75 * signal])
    split = split_train_test([f"e{i}" for i in range(n)], y, 0.25)
    proj = direction_projections(parts.sum(0), parts, y, split, 2)
    assert proj.parts.shape == (3, len(split.test)) and proj.total.shape == (len(split.test),)
    torch.testing.assert_close(proj.parts.sum(0), proj.total)
    shares = proj.parts.mean(1) / proj.total.mean()
    torch.testing.assert_close(shares, torch.tensor([0.0, 0.25, 0.75]))
    assert proj.total.mean() > 0  # held-out entities project onto their own value's direction


def test_probe_hits_match_the_labelers_full_probe():
    gen = torch.Generator().manual_seed(1)
    n, d = 90, 12
    y = torch.arange(n) % 3
    x = torch.randn(2, n, d, generator=gen)
    x[0, :, 3] += 4.0 * (y == 1)  # hook 0 carries the classes, hook 1 is noise
    x[0, :, 7] += 4.0 * (y == 2)
    split = split_train_test([f"e{i}" for i in range(n)], y, 0.25)
    hits = probe_hits(x, y, split, 3, steps=60)
    assert hits.shape == (2, len(split.test)) and hits.dtype == torch.bool
    for h in range(2):
        assert math.isclose(float(hits[h].float().mean()), full_probe(x[h], y, split, 3, steps=60).accuracy)
    assert hits[0].float().mean() > 0.8 > hits[1].float().mean()


# ---------------------------------------------------------------------------------------------
# A tiny model with a planted attribute


def word_tokenizer(entities: list[str]) -> PreTrainedTokenizerFast:
    words = ["<|endoftext|>", "[UNK]", "The", "thing", "Fact:", "is", "coloured", "weighs", "heavy", "light", *COLOURS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + entities)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def planted(tiny_model):
    """A copy of the tiny model whose entity tokens' embeddings carry their colour's direction (the weight is
    random, unplanted), and the entity set: 72 things, 3 colours, and a single-valued attribute."""
    n = 72
    names = [f"ent{i}" for i in range(n)]
    gen = torch.Generator().manual_seed(5)
    weights = ["heavy" if w else "light" for w in (torch.rand(n, generator=gen) < 0.5).tolist()]
    es = EntitySet("thing", names, {"colour": [COLOURS[i % 3] for i in range(n)], "weight": weights,
                                    "kind": ["thing"] * n},
                   {"colour": AttributeTemplates(["Fact: The thing {entity} is coloured"]),
                    "weight": AttributeTemplates(["Fact: The thing {entity} weighs"]),
                    "kind": AttributeTemplates(["Fact: The thing {entity} is"])}, "The thing {entity}")
    tok = word_tokenizer(names)
    model = copy.deepcopy(tiny_model)
    dirs = torch.nn.functional.normalize(torch.randn(3, model.cfg.d_model, generator=gen), dim=1)
    scale = model.W_E.norm(dim=1).mean()
    with torch.no_grad():
        for i, name in enumerate(names):
            model.W_E[tok.convert_tokens_to_ids(name)] += 1.5 * scale * dirs[i % 3]
    cfg = LookupConfig(max_layer=2, knowledge_filter=False, batch_size=16, probe_steps=60, resamples=300)
    result = lookup_by_layer(model, [es], cfg, tokenizer=tok, log=lambda m: None)
    return model, es, tok, cfg, result


def test_planted_attribute_is_read_at_every_layer(planted):
    _, _, _, _, result = planted
    assert result.layers == [0, 1, 2] and result.n_layers == 3 and result.timings["forward"] > 0
    colour, weight, kind = result.attributes
    assert kind.skipped and "1 distinct value" in kind.skipped
    for a in (colour, weight):
        assert a.skipped is None and a.n_known == 72 and a.n_train + a.n_test == 72
        assert len(a.resid) == len(a.mlp_out) == len(a.mlp_share) == 3
        for s in a.resid + a.mlp_out:
            assert 0 <= s.lo <= s.value <= s.hi <= 1
    assert math.isclose(colour.baseline, 1 / 3, abs_tol=1e-6)
    assert colour.values == [("blue", 24), ("green", 24), ("red", 24)]
    assert all(s.value >= 0.9 and s.lo > colour.baseline for s in colour.resid)
    assert colour.readable_from() == 0
    mean = {a.attribute: sum(s.value for s in a.resid) / 3 for a in (colour, weight)}
    assert mean["colour"] - mean["weight"] > 0.2  # the unplanted attribute is read far worse
    # the direction is planted in the token embedding: readable there already, and the embedding keeps a share of
    # it (the random MLPs and attention, reading the embedding, wrote the rest)
    assert colour.embedding.value >= 0.9 and colour.embedding_share.lo > 0
    shares = colour.embedding_share.value + colour.attention_share.value + sum(s.value for s in colour.mlp_share)
    assert math.isclose(shares, 1.0, abs_tol=1e-4)


def test_the_residual_stream_is_the_sum_of_its_writers(planted):
    """The premise of the MLP shares, checked on the model: resid_post at layer L is the embedding plus every
    attention and MLP output up to L, so the embedding's, each attention layer's and each MLP's shares sum to 1."""
    model, es, tok, cfg, result = planted
    from features.labeling.prompts import encode_prompt

    prompts = [encode_prompt(tok, es.templates["colour"].templates[0], e, 0) for e in es.entities]
    tokens = torch.tensor([p.ids for p in prompts])  # one length: no padding
    hooks = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"] + [
        f"blocks.{i}.hook_{k}_out" for i in range(3) for k in ("attn", "mlp")]
    acts = {h: a[torch.arange(len(prompts)), torch.tensor([p.span[1] - 1 for p in prompts])]
            for h, a in run_to(model, tokens, hooks).items()}
    writers = torch.stack([acts[h] for h in hooks if h != "blocks.2.hook_resid_post"])
    torch.testing.assert_close(writers.sum(0), acts["blocks.2.hook_resid_post"], rtol=1e-4, atol=1e-4)
    y = torch.tensor([COLOURS.index(v) for v in es.attributes["colour"]])
    split = split_train_test(es.entities, y, cfg.test_fraction)
    proj = direction_projections(acts["blocks.2.hook_resid_post"], writers, y, split, 3)
    assert math.isclose(float(proj.parts.mean(1).sum() / proj.total.mean()), 1.0, abs_tol=1e-4)
    # ... and the lookup's own shares are these writers' shares (writer i is hooks[i], the stream left out)
    share = (proj.parts.mean(1) / proj.total.mean()).tolist()
    colour = result.attributes[0]
    assert math.isclose(colour.embedding_share.value, share[0], abs_tol=1e-4)
    for layer in range(3):
        row = hooks.index(f"blocks.{layer}.hook_mlp_out") - 1
        assert math.isclose(colour.mlp_share[layer].value, share[row], abs_tol=1e-4)
    attention = sum(share[hooks.index(f"blocks.{layer}.hook_attn_out") - 1] for layer in range(3))
    assert math.isclose(colour.attention_share.value, attention, abs_tol=1e-4)


def test_the_filters_pass_captures_what_run_to_captures(planted):
    """With the knowledge filter the first template's full pass captures the layers; without it run_to does."""
    model, es, tok, cfg, _ = planted
    names = es.entities[:20]
    answers = torch.tensor([tok.convert_tokens_to_ids(c) for c in COLOURS])
    states = []
    for on in (True, False):
        run = _Run(model, tok, LookupConfig(max_layer=1, knowledge_filter=on, batch_size=8), [0, 1], 0, Timer())
        acts, total = _states(run, es, "colour", names, answers)
        assert acts.shape == (5, 20, model.cfg.d_model) and total.shape == (20, 3)  # embedding, resid x2, mlp x2
        assert (total < 0).all() if on else (total == 0).all()
        states.append(acts)
    torch.testing.assert_close(states[0], states[1], rtol=1e-4, atol=1e-5)


def test_knowledge_filter_and_bad_settings(planted):
    model, es, tok, _, _ = planted
    result = lookup_by_layer(model, [es], LookupConfig(max_layer=1, attributes=["thing.colour"], batch_size=24),
                             tokenizer=tok, log=lambda m: None)
    (colour,) = result.attributes
    # a random model ranks one first token first for nearly every entity: the filter leaves too few
    assert colour.skipped and "knowledge filter" in colour.skipped and colour.resid == []
    with pytest.raises(SaekitError, match=r"lookup.attributes names thing.size.*thing.colour"):
        lookup_by_layer(model, [es], LookupConfig(attributes=["thing.size"]), tokenizer=tok)
    with pytest.raises(SaekitError, match=r"lookup.max_layer=3 is out of range.*3 layers"):
        lookup_by_layer(model, [es], LookupConfig(max_layer=3), tokenizer=tok)
    with pytest.raises(SaekitError, match="needs one to build entity prompts"):
        lookup_by_layer(model, [es], LookupConfig())
    for bad, key in ((dict(test_fraction=1.0), "test_fraction"), (dict(min_class_size=1), "min_class_size"),
                     (dict(resamples=0), "resamples"), (dict(max_layer=-1), "max_layer")):
        with pytest.raises(SaekitError, match=f"lookup.{key}"):
            LookupConfig(**bad)
    shared = LookupConfig.from_label(LabelConfig(max_entities=40, probe_steps=30), max_layer=1)
    assert (shared.max_entities, shared.probe_steps, shared.max_layer) == (40, 30, 1)


def render_page(folder: str | None) -> None:
    from pathlib import Path

    from features.viewer import lookup_page

    lookup_page.render(Path(folder) if folder else None)


def test_report_files_and_viewer_page(planted, tmp_path):
    result = planted[-1]
    md = write_lookup(tmp_path / "reports" / "run", result)
    folder = md.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOOKUP_JSON, LOOKUP_MD, LOOKUP_PNG])
    assert (folder / LOOKUP_PNG).read_bytes()[:4] == b"\x89PNG"

    def no_nan(token: str) -> None:
        raise AssertionError(f"lookup.json holds {token}, which is not JSON")

    data = json.loads((folder / LOOKUP_JSON).read_text(), parse_constant=no_nan)
    colour = data["attributes"][0]
    assert data["layers"] == [0, 1, 2] and data["direction_hook"] == "blocks.2.hook_resid_post"
    assert len(colour["resid"]) == 3 and set(colour["resid"][0]) == set(colour["embedding"]) == {"value", "lo", "hi"}
    assert colour["readable_from"]["resid"] == 0 and data["attributes"][2]["baseline"] is None
    text = md.read_text()
    assert "| thing.colour | 72 (" in text and "## thing.colour" in text and "| attention, all layers |" in text
    assert "- thing.kind: thing.kind has 1 distinct value" in text

    at = AppTest.from_function(render_page, args=(str(folder),), default_timeout=60)
    at.run()
    assert not at.exception, at.exception[0].message if at.exception else ""
    assert at.title[0].value == "Where the lookup happens" and len(at.get("image")) == 1
    shown = "\n".join(m.value for m in at.markdown)
    assert "thing.colour" in shown and "majority-value baseline" in shown and "# Where" not in shown
    assert "layers 0-2 of 3" in at.caption[0].value

    for missing in (str(tmp_path / "empty"), None):
        at = AppTest.from_function(render_page, args=(missing,), default_timeout=60)
        at.run()
        assert not at.exception and "No lookup-by-layer report" in at.info[0].value
        assert "saekit lookup --config" in at.code[0].value


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_real_model_reads_continents_by_the_middle_layer(real_model, tmp_path):
    """SmolLM2 on 80 countries: continent is readable above the majority baseline (95% interval) by layer 15."""
    (es,) = load_entities(LabelConfig(entity_types=["country"]))
    cfg = LookupConfig(max_entities=80, attributes=["country.continent"], probe_steps=100, resamples=500)
    result = lookup_by_layer(real_model, [es], cfg, log=lambda m: None)
    (cont,) = result.attributes
    assert result.layers == list(range(16)) and cont.skipped is None and cont.n_known >= 50, cont.skipped
    assert cont.resid[-1].value > cont.baseline
    readable = cont.readable_from()
    assert readable is not None and readable <= 15
    assert cont.projection > 0
    shares = cont.embedding_share.value + cont.attention_share.value + sum(s.value for s in cont.mlp_share)
    assert math.isclose(shares, 1.0, abs_tol=1e-3)
    assert write_lookup(tmp_path, result).is_file()
