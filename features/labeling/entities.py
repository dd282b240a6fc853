"""Entity-attribute datasets and prompt templates: the ground truth the labeler scores features against.

Early MLP layers behave like a lookup from an entity's tokens to directions for its attributes
("Kenya" -> continent = Africa). To find those directions we need, per entity type, a list of
entities, one categorical value per attribute, a neutral *context* prompt to read the entity's
activations from, and *attribute* prompts whose next token is the answer.

File format (one entity type = two files side by side; add your own without writing code)
------------------------------------------------------------------------------------------
``<name>.csv`` -- UTF-8, comma-separated, one header line then one line per entity::

    entity,continent,language
    Kenya,Africa,English
    Peru,South America,Spanish

* an ``entity`` column (the name as it should appear in text) and one column per attribute;
* every cell filled in (leave an entity out rather than leave a value empty), entity names unique;
* values are categorical: entities sharing a value share the attribute direction.

``<name>.templates.json``::

    {
      "entity_type": "country",
      "description": "optional free text",
      "context_template": "The country {entity}",
      "attributes": {
        "continent": {"templates": ["Fact: {entity} is a country on the continent of"],
                      "answer_prefix": " "},
        "language": {"templates": ["Fact: The official language of {entity} is"]}
      }
    }

* every template contains ``{entity}`` (replaced literally; other braces are kept as text);
* ``context_template`` ends with ``{entity}``, so the entity's last token is the prompt's last token;
* attribute templates end without trailing whitespace: the answer is ``answer_prefix + value``
  (default prefix ``" "``, the usual leading space of a next word), e.g. ``" Africa"``;
* the CSV's attribute columns and the JSON's ``attributes`` keys are the same set.

Problems are reported as ``SaekitError`` naming the file, the line (as a person counts it, header =
line 1) and the fix. An attribute with a single value is *not* an error here -- it is legal data that
just cannot separate entities; `usable_attributes` reports it so callers can skip it with a reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from features.labeling.config import LabelConfig
from sae.errors import SaekitError
from sae.io import atomic_write_text

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "data"  # features/data
CSV_SUFFIX = ".csv"
TEMPLATES_SUFFIX = ".templates.json"
PLACEHOLDER = "{entity}"
_TOP_KEYS = {"entity_type", "description", "context_template", "attributes"}
_ATTRIBUTE_KEYS = {"templates", "answer_prefix"}


@dataclass
class AttributeTemplates:
    """Prompts for one attribute; several phrasings let a caller average out template quirks."""

    templates: list[str]
    answer_prefix: str = " "


@dataclass
class EntitySet:
    """One entity type: entities, one value per entity for each attribute, and prompt templates."""

    entity_type: str
    entities: list[str]
    attributes: dict[str, list[str]]
    templates: dict[str, AttributeTemplates]
    context_template: str
    description: str = ""
    source: Path | None = field(default=None, compare=False)

    def values(self, attribute: str) -> list[tuple[str, int]]:
        """Distinct values of `attribute`, sorted, each with how many entities have it."""
        return sorted(Counter(self._column(attribute)).items())

    def context(self, entity: str) -> str:
        """The neutral prompt whose last token is the entity's last token."""
        return self.context_template.replace(PLACEHOLDER, entity)

    def _column(self, attribute: str) -> list[str]:
        if attribute not in self.attributes:
            raise SaekitError(f"entity type '{self.entity_type}' has no attribute '{attribute}'; "
                              f"choose one of: {', '.join(self.attributes)}")
        return self.attributes[attribute]


class Prompt(NamedTuple):
    """One attribute prompt: the model should continue `prompt` with `answer`."""

    entity: str
    prompt: str
    answer: str


def prompts(entity_set: EntitySet, attribute: str, template: int | None = None) -> list[Prompt]:
    """Every (entity, prompt, answer) for `attribute`; all templates in order, or just index `template`."""
    column = entity_set._column(attribute)
    spec = entity_set.templates[attribute]
    chosen = spec.templates if template is None else [_pick(spec.templates, template, attribute)]
    return [Prompt(entity, t.replace(PLACEHOLDER, entity), spec.answer_prefix + value)
            for t in chosen for entity, value in zip(entity_set.entities, column, strict=True)]


def _pick(templates: list[str], index: int, attribute: str) -> str:
    if not -len(templates) <= index < len(templates):
        raise SaekitError(f"attribute '{attribute}' has {len(templates)} templates; "
                          f"choose an index from 0 to {len(templates) - 1}")
    return templates[index]


def value_counts(entity_set: EntitySet, attribute: str, rows: list[int]) -> dict[str, int]:
    """How many of the entities `rows` have each value of `attribute`."""
    counts: dict[str, int] = {}
    for i in rows:
        value = entity_set.attributes[attribute][i]
        counts[value] = counts.get(value, 0) + 1
    return counts


def too_few_per_value(counts: dict[str, int], min_size: int) -> str | None:
    """Why an attribute cannot be scored before any forward pass (fewer than 2 values with `min_size` entities
    each among `counts`), or None; one rule for the labeler, the directions and the lookup."""
    if sum(c >= min_size for c in counts.values()) < 2:
        return f"fewer than 2 values with at least {min_size} entities (largest: {max(counts.values(), default=0)})"
    return None


def usable_attributes(entity_set: EntitySet, min_values: int = 2,
                      min_entities: int = 10) -> tuple[list[str], dict[str, str]]:
    """Split attributes into those worth scoring and those to skip, with the reason for each skip.

    An attribute needs at least `min_values` distinct values (one value separates nothing) and the
    set needs at least `min_entities` entities (fewer cannot support a direction).
    """
    usable: list[str] = []
    skipped: dict[str, str] = {}
    n = len(entity_set.entities)
    for attribute in entity_set.attributes:
        distinct = len(entity_set.values(attribute))
        if distinct < min_values:
            skipped[attribute] = (f"{entity_set.entity_type}.{attribute} has {distinct} distinct value(s), "
                                  f"needs at least {min_values}")
        elif n < min_entities:
            skipped[attribute] = (f"{entity_set.entity_type}.{attribute} has {n} entities, "
                                  f"needs at least {min_entities}")
        else:
            usable.append(attribute)
    return usable, skipped


# ---------------------------------------------------------------------------------------- loading


def _paths(path: str | Path) -> tuple[Path, Path]:
    """Accept `x.csv`, `x.templates.json` or `x` and return both files of the pair."""
    path = Path(path)
    name = path.name
    for suffix in (TEMPLATES_SUFFIX, CSV_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + CSV_SUFFIX), path.with_name(name + TEMPLATES_SUFFIX)


def load_entity_set(path: str | Path) -> EntitySet:
    """Read and validate one entity type from `<name>.csv` + `<name>.templates.json`."""
    csv_path, json_path = _paths(path)
    for p in (csv_path, json_path):
        if not p.is_file():
            raise SaekitError(f"{p}: file not found; an entity type needs both {csv_path.name} and "
                              f"{json_path.name} in the same folder (format: features/data/README.md)")
    spec, json_text = _read_templates(json_path)
    header, rows = _read_csv(csv_path)
    columns = header[1:]
    spec_attrs = spec["attributes"]
    for a in columns:
        if a not in spec_attrs:
            raise SaekitError(f"{csv_path}, line 1: column '{a}' has no templates in {json_path.name}; "
                              f"add \"{a}\" under \"attributes\" there or delete the column")
    for a in spec_attrs:
        if a not in columns:
            raise SaekitError(f"{json_path}, line {_line_of(json_text, a)}: attribute '{a}' has templates "
                              f"but {csv_path.name} has no '{a}' column; add the column or remove the attribute")
    return EntitySet(
        entity_type=spec["entity_type"],
        entities=[r[0] for r in rows],
        attributes={a: [r[i + 1] for r in rows] for i, a in enumerate(columns)},
        templates={a: spec_attrs[a] for a in columns},
        context_template=spec["context_template"],
        description=spec.get("description", ""),
        source=csv_path,
    )


def load_entity_sets(directory: str | Path) -> list[EntitySet]:
    """Every entity type in `directory`, in name order; a CSV without templates is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SaekitError(f"{directory}: not a folder; pass the folder holding <name>.csv and "
                          f"<name>.templates.json files")
    names = sorted({p.name[: -len(TEMPLATES_SUFFIX)] for p in directory.glob("*" + TEMPLATES_SUFFIX)}
                   | {p.stem for p in directory.glob("*" + CSV_SUFFIX)})
    if not names:
        raise SaekitError(f"{directory}: no entity types found; add <name>.csv and <name>.templates.json "
                          f"(format: features/data/README.md)")
    return [load_entity_set(directory / name) for name in names]


def load_builtin_entity_sets() -> list[EntitySet]:
    """The entity types shipped with saekit (built by scripts/build_entities.py)."""
    return load_entity_sets(BUILTIN_DIR)


def load_entities(cfg: LabelConfig) -> list[EntitySet]:
    """The entity sets the `label` section asks for; cheap, so the CLI calls it to report a bad file before the
    model loads."""
    sets = load_builtin_entity_sets() if cfg.entities == "builtin" else load_entity_sets(Path(cfg.entities))
    if cfg.entity_types is not None:
        known = {s.entity_type for s in sets}
        missing = [t for t in cfg.entity_types if t not in known]
        if missing:
            raise SaekitError(f"label.entity_types names {', '.join(missing)}, not among the entity types in "
                              f"{cfg.entities}: {', '.join(sorted(known))}")
        sets = [s for s in sets if s.entity_type in cfg.entity_types]
    return sets


def _line_of(text: str, key: str) -> int:
    """1-based line of the first occurrence of `key` as a JSON string, so errors point near it."""
    for needle in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        at = text.find(needle)
        if at >= 0:
            return text.count("\n", 0, at) + 1
    return 1


def _read_templates(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SaekitError(f"{path}: cannot read ({e}); save it as UTF-8 text") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SaekitError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                          f"fix the syntax there") from e

    def fail(key: str, problem: str) -> SaekitError:
        return SaekitError(f"{path}, line {_line_of(text, key)}: {problem}")

    if not isinstance(raw, dict):
        raise SaekitError(f"{path}, line 1: expected a JSON object with keys {sorted(_TOP_KEYS)}")
    for k in raw:
        if k not in _TOP_KEYS:
            raise fail(k, f"unknown key '{k}'; allowed keys are {', '.join(sorted(_TOP_KEYS))}")
    for k in ("entity_type", "context_template"):
        if not isinstance(raw.get(k), str) or not raw[k].strip():
            raise fail(k, f"'{k}' must be a non-empty string")
    if not isinstance(raw.get("description", ""), str):
        raise fail("description", "'description' must be a string")
    context = raw["context_template"]
    if not context.endswith(PLACEHOLDER):
        raise fail(context, f"context_template {context!r} must end with {PLACEHOLDER}, so the entity's "
                            f"last token is the prompt's last token")
    attrs = raw.get("attributes")
    if not isinstance(attrs, dict) or not attrs:
        raise fail("attributes", "'attributes' must be an object mapping each attribute to "
                                 "{\"templates\": [...]}")
    parsed: dict[str, AttributeTemplates] = {}
    for name, spec in attrs.items():
        if not isinstance(spec, dict):
            raise fail(name, f"attribute '{name}' must be an object like "
                             f"{{\"templates\": [\"... {PLACEHOLDER} ...\"]}}")
        for k in spec:
            if k not in _ATTRIBUTE_KEYS:
                raise fail(k, f"attribute '{name}' has unknown key '{k}'; allowed keys are "
                              f"{', '.join(sorted(_ATTRIBUTE_KEYS))}")
        templates = spec.get("templates")
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise fail(name, f"attribute '{name}' needs \"templates\": a non-empty list of strings")
        prefix = spec.get("answer_prefix", " ")
        if not isinstance(prefix, str):
            raise fail(name, f"attribute '{name}': answer_prefix must be a string such as \" \"")
        for t in templates:
            if PLACEHOLDER not in t:
                raise fail(t, f"template {t!r} of attribute '{name}' has no {PLACEHOLDER}; "
                              f"write {PLACEHOLDER} where the entity's name goes")
            if t != t.rstrip():
                raise fail(t, f"template {t!r} of attribute '{name}' ends with whitespace; remove it "
                              f"(the answer carries the space via answer_prefix)")
        parsed[name] = AttributeTemplates(templates=list(templates), answer_prefix=prefix)
    return {**raw, "attributes": parsed}, text


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows, all cells stripped; every problem names the line a person would count."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SaekitError(f"{path}: cannot read ({e}); save it as UTF-8 text") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip() for c in next(reader, [])]
        if not header or header[0] != "entity":
            raise SaekitError(f"{path}, line 1: the first column must be 'entity' (found "
                              f"{header[0] if header else 'an empty line'!r}); start the header with entity,")
        for i, c in enumerate(header):
            if not c:
                raise SaekitError(f"{path}, line 1: column {i + 1} has no name; name it or delete it")
            if header.index(c) != i:
                raise SaekitError(f"{path}, line 1: column '{c}' appears twice; rename or delete one")
        if len(header) < 2:
            raise SaekitError(f"{path}, line 1: no attribute columns; add at least one after 'entity'")
        rows: list[list[str]] = []
        first_line: dict[str, int] = {}
        for raw in reader:
            line = reader.line_num
            if not any(c.strip() for c in raw):
                continue
            row = [c.strip() for c in raw]
            if len(row) != len(header):
                raise SaekitError(f"{path}, line {line}: {len(row)} fields but the header has {len(header)}; "
                                  f"quote values that contain commas and fill every column")
            for column, value in zip(header, row, strict=True):
                if not value:
                    raise SaekitError(f"{path}, line {line}: empty value in column '{column}'; fill it in "
                                      f"or delete the line (every entity needs every attribute)")
            if row[0] in first_line:
                raise SaekitError(f"{path}, line {line}: entity '{row[0]}' already appears on line "
                                  f"{first_line[row[0]]}; keep one line per entity")
            first_line[row[0]] = line
            rows.append(row)
    except csv.Error as e:
        raise SaekitError(f"{path}, line {reader.line_num}: malformed CSV ({e}); check the quotes") from e
    if not rows:
        raise SaekitError(f"{path}: no entities below the header; add one line per entity")
    return header, rows


# ---------------------------------------------------------------------------------------- saving


def save_entity_set(entity_set: EntitySet, directory: str | Path, name: str | None = None) -> Path:
    """Write `<name>.csv` and `<name>.templates.json` atomically; returns the CSV path."""
    directory = Path(directory)
    name = name or entity_set.entity_type
    columns = list(entity_set.attributes)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["entity", *columns])
    for i, entity in enumerate(entity_set.entities):
        writer.writerow([entity, *(entity_set.attributes[a][i] for a in columns)])
    spec: dict[str, Any] = {"entity_type": entity_set.entity_type}
    if entity_set.description:
        spec["description"] = entity_set.description
    spec["context_template"] = entity_set.context_template
    spec["attributes"] = {a: {"templates": entity_set.templates[a].templates,
                              "answer_prefix": entity_set.templates[a].answer_prefix} for a in columns}
    atomic_write_text(directory / (name + TEMPLATES_SUFFIX), json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    csv_path = directory / (name + CSV_SUFFIX)
    atomic_write_text(csv_path, buf.getvalue())
    return csv_path
