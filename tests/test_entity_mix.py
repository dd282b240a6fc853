"""The entity-rich training mix: facts about the directions' training entities only, at the asked share of the
text, readable as a corpus; through `saekit mix` with a user's own entity files, and on the built-in entities
with the embedded corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from features import cli
from features.labeling import AttributeTemplates, EntitySet, load_builtin_entity_sets, save_entity_set
from features.labeling.directions import split_entities
from features.labeling.entity_mix import fact_documents, write_mix
from sae.corpus import iter_documents
from sae.errors import SaekitError


def planets(n: int = 40) -> EntitySet:
    return EntitySet(
        entity_type="planet", entities=[f"Planet{i}" for i in range(n)],
        attributes={"ring": [("icy", "rocky")[i % 2] for i in range(n)],
                    "star": [("Sol", "Vega", "Rigel")[i % 3] for i in range(n)]},
        templates={"ring": AttributeTemplates(["Fact: {entity} has rings that are", "The rings of {entity} are"]),
                   "star": AttributeTemplates(["Fact: {entity} orbits the star"])},
        context_template="The planet {entity}")


def _corpus(path: Path, docs: int = 30) -> Path:
    path.write_text("\n<|endoftext|>\n".join(f"Document {i} says something plain about the weather. " * 6
                                              for i in range(docs)), encoding="utf-8")
    return path


def _names_in(text: str, names: list[str]) -> set[str]:
    return {n for n in names if f"{n} " in text or f"{n}." in text}


def test_facts_name_only_training_entities_with_their_values():
    es = planets()
    docs, held_out = fact_documents([es], train_fraction=0.5, seed=0)
    train = [n for n, t in zip(es.entities, split_entities("planet", es.entities, 0.5, 0).tolist(), strict=True) if t]
    assert len(docs) == len(train) and held_out == len(es.entities) - len(train) and 0 < len(train) < len(es.entities)
    for doc, name in zip(docs, train, strict=True):
        row = es.entities.index(name)
        assert _names_in(doc, es.entities) == {name}
        assert f"Fact: {name} has rings that are {es.attributes['ring'][row]}." in doc
        assert f"Fact: {name} orbits the star {es.attributes['star'][row]}." in doc
        assert doc.count("Fact:") + doc.count("The rings") == 3  # every template of every attribute
    assert fact_documents([es], 0.5, seed=1)[0] != docs  # the split follows the directions' seed


def test_mix_has_the_asked_share_and_never_a_held_out_entity(tmp_path):
    es = planets()
    out = tmp_path / "mix.jsonl"
    stats = write_mix(out, str(_corpus(tmp_path / "c.txt")), [es], fraction=0.25, train_fraction=0.5, seed=0)
    docs = list(iter_documents(str(out)))  # the mix is itself a corpus source
    facts = [d for d in docs if "Fact:" in d]
    assert len(docs) == stats.corpus_documents + stats.fact_documents and len(facts) == stats.fact_documents
    assert stats.corpus_documents == 30 and abs(stats.fact_share - 0.25) < 0.02
    held_out = [n for n, t in zip(es.entities, split_entities("planet", es.entities, 0.5, 0).tolist(), strict=True)
                if not t]
    assert not _names_in("\n".join(facts), held_out)
    corpus_at = [i for i, d in enumerate(docs) if "Fact:" not in d]
    gaps_with_facts = sum(b - a > 1 for a, b in zip(corpus_at, corpus_at[1:], strict=False))
    assert gaps_with_facts >= 25  # spread between the corpus's documents, not bunched at one end
    assert not list(tmp_path.glob(".mix.jsonl.*"))  # written atomically: no temporary file is left
    capped = write_mix(tmp_path / "capped.jsonl", str(tmp_path / "c.txt"), [es], 0.25, 0.5, 0, max_chars=2000)
    assert capped.corpus_documents < 30


def test_mix_refuses_bad_shares_and_names(tmp_path):
    corpus = str(_corpus(tmp_path / "c.txt"))
    with pytest.raises(SaekitError, match="strictly between 0 and 1"):
        write_mix(tmp_path / "m.jsonl", corpus, [planets()], 1.0, 0.5, 0)
    with pytest.raises(SaekitError, match=r"name the output \*.jsonl"):
        write_mix(tmp_path / "m.txt", corpus, [planets()], 0.2, 0.5, 0)
    with pytest.raises(SaekitError, match="no training entity"):
        write_mix(tmp_path / "m.jsonl", corpus, [planets(1)], 0.2, 0.01, 3)
    assert not (tmp_path / "m.jsonl").exists()


def test_mix_command_with_a_users_entity_files(tmp_path, capsys):
    save_entity_set(planets(), tmp_path / "entities")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "mix", "runs_dir": str(tmp_path / "runs"),
                                      "label": {"entities": str(tmp_path / "entities")},
                                      "directions": {"train_fraction": 0.6, "seed": 2}}))
    out = tmp_path / "mix.jsonl"
    args = ["mix", "--config", str(config), "--out", str(out), "--corpus", str(_corpus(tmp_path / "c.txt")),
            "--fraction", "0.3"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "fact documents" in printed and f"corpus.source: {out}" in printed
    train = split_entities("planet", planets().entities, 0.6, 2)
    facts = [json.loads(line)["text"] for line in out.read_text().splitlines() if "Fact:" in line]
    assert {n for d in facts for n in _names_in(d, planets().entities)} == {
        n for n, t in zip(planets().entities, train.tolist(), strict=True) if t}
    assert cli.main(args) == 2  # an existing output is refused ...
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0  # ... unless asked


def test_mix_of_the_builtin_entities_and_the_embedded_corpus(tmp_path):
    sets = load_builtin_entity_sets()
    stats = write_mix(tmp_path / "mix.jsonl", "embedded", sets, 0.2, 0.5, 0, max_chars=400_000)
    assert stats.entities_written > 1000 and stats.entities_held_out > 1000
    assert 0.18 < stats.fact_share < 0.22 and stats.corpus_documents > 0
    facts = [d for d in iter_documents(str(tmp_path / "mix.jsonl")) if d.startswith("Fact:")]
    assert facts and set(facts) <= set(fact_documents(sets, 0.5, 0)[0])  # training entities' facts, nothing else
