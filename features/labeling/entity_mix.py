"""A training corpus with more entity mentions: the corpus's documents interleaved with short fact documents.

Each fact document states one entity's attributes in the entity set's own prompt templates ("Fact: Kenya is located
on the continent of Africa."). Only the *training* entities of `saekit directions` (the same name-hash split, train
fraction and seed) are written, so every directions figure stays on entities the SAEs never read in a fact; the
held-out entities appear only as often as the corpus itself mentions them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from features.labeling.directions import split_entities
from features.labeling.entities import PLACEHOLDER, EntitySet
from sae.corpus import iter_documents
from sae.errors import SaekitError
from sae.io import atomic_write


class MixStats(NamedTuple):
    """What a mix holds: documents and characters of each kind, and how many entities the facts name."""

    corpus_documents: int
    corpus_chars: int
    fact_documents: int
    fact_chars: int
    entities_written: int
    entities_held_out: int

    @property
    def fact_share(self) -> float:
        total = self.corpus_chars + self.fact_chars
        return self.fact_chars / total if total else 0.0


def fact_documents(entity_sets: list[EntitySet], train_fraction: float, seed: int) -> tuple[list[str], int]:
    """One document per training entity: every template of every attribute, completed with the entity's value;
    and how many entities were held out (never written)."""
    docs: list[str] = []
    held_out = 0
    for es in entity_sets:
        is_train = split_entities(es.entity_type, es.entities, train_fraction, seed)
        held_out += int((~is_train).sum())
        for row, name in enumerate(es.entities):
            if not is_train[row]:
                continue
            facts = [t.replace(PLACEHOLDER, name) + tpl.answer_prefix + es.attributes[attr][row] + "."
                     for attr, tpl in es.templates.items() for t in tpl.templates]
            docs.append(" ".join(facts))
    return docs, held_out


def _cycled(docs: list[str], seed: int) -> Iterator[str]:
    """The fact documents forever, in a fresh seeded order on every pass."""
    rng = random.Random(seed)
    while True:
        order = list(docs)
        rng.shuffle(order)
        yield from order


def write_mix(out: Path, corpus: str, entity_sets: list[EntitySet], fraction: float, train_fraction: float,
              seed: int, max_chars: int | None = None) -> MixStats:
    """Write a .jsonl corpus (one {"text": ...} per document, atomically) in which fact documents make up
    `fraction` of the characters, spread evenly among the corpus's documents; stops after `max_chars` in all."""
    if not 0.0 < fraction < 1.0:
        raise SaekitError(f"the fact share must be strictly between 0 and 1 (e.g. 0.2), got {fraction}")
    if out.suffix != ".jsonl":
        raise SaekitError(f"the mix is written as JSON lines; name the output *.jsonl, got {out}")
    docs, held_out = fact_documents(entity_sets, train_fraction, seed)
    if not docs:
        raise SaekitError("no training entity to write facts about: every entity fell in the held-out split; "
                          "raise directions.train_fraction or add entities")
    counts = [0, 0, 0, 0]  # corpus docs, corpus chars, fact docs, fact chars
    ratio = fraction / (1.0 - fraction)

    def write(tmp: Path) -> None:
        facts = _cycled(docs, seed)
        with open(tmp, "w", encoding="utf-8") as fh:
            for doc in iter_documents(corpus):
                fh.write(json.dumps({"text": doc}) + "\n")
                counts[0] += 1
                counts[1] += len(doc)
                while counts[3] < ratio * counts[1]:
                    fact = next(facts)
                    fh.write(json.dumps({"text": fact}) + "\n")
                    counts[2] += 1
                    counts[3] += len(fact)
                if max_chars is not None and counts[1] + counts[3] >= max_chars:
                    break

    atomic_write(out, write)
    return MixStats(counts[0], counts[1], counts[2], counts[3], len(docs), held_out)
