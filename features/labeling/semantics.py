"""Monosemanticity scores for every SAE feature and MLP neuron, from the feature store's examples.

A unit is monosemantic when one human concept accounts for most of what it does. Without an LLM we use concepts
that rules can compute for any token of the analysed text:

- ``token:<t>``: the token itself (lower-cased, spaces stripped: " The" and "the" are one concept);
- ``lex:<class>``: lexical classes by fixed rules: number, punctuation, whitespace, function word (a fixed list
  of English closed-class words), capitalised word, word piece (continues the previous token's word), and, for
  lower-case words, the suffix classes -ing, -ed, -ly, -tion, -er, -s;
- ``wn:<lexname>``: the WordNet lexicographer file of the word's most frequent sense, per part of speech
  (noun.person, noun.location, verb.motion, ...), and ``wn:<lemma>.<n|v>``: every hypernym of the most frequent
  noun and verb sense (rooster -> ... -> wn:bird.n -> wn:vertebrate.n -> ... -> wn:entity.n), so a unit on
  "rooster, hawks, fowl, bird" has the concept bird; from WordNet's database installed locally
  (`/usr/share/wordnet`, Debian's wordnet-base, which scripts/ensure_wordnet.sh installs; never downloaded); the
  report says whether it was used;
- ``entity:<type>`` and ``<type>.<attribute>=<value>``: the token is part of a mention of a known entity of the
  labeler's entity sets (e.g. "country.continent=Africa" on every token of " Kenya").

Scores, in the spirit of the log-likelihood-ratio proxies of "Towards Monosemanticity" (Bricken et al., 2023):
for a unit and a concept c,

    P(c | fires)   the share of the unit's activation mass on tokens with concept c, estimated from the
                   analysis pass's *interval* examples -- uniform samples from equal-width intervals spanning
                   the unit's whole activation range above its on threshold t (features/analyze/on_rule.py: 0
                   for features, a quantile matched to the features' firing rate for neurons), each example
                   weighted by its interval's firing count / its number of examples x its activation above t,
                   so weak, frequent firings count as much as they occur and both kinds are judged alike;
    P(c)           the concept's share of all analysed tokens (the base rate);
    LLR(c)         log P(c | fires) / P(c): how much more often c appears when the unit fires.

A concept is *specific* to the unit when LLR >= log(MIN_ENRICHMENT) (4x over its base rate; a unit that fires on
anything has LLR ~ 0 for every concept). A unit has only ~50 interval examples, a few of which can carry most of
the weight, and the best of many candidate concepts would otherwise win by chance; so each P(c | fires) is taken
at its lower one-standard-error bound, p - sqrt(p (1 - p) / n_eff), with n_eff = (sum w)^2 / sum w^2 the
effective number of examples. The unit's score is the largest such bound over its specific concepts (0 if none):
how much of the unit one specific concept surely explains. Classes (the store's `class` column):

- ``dead`` (dead or too rare to judge): fewer than MIN_FIRES firings in the analysis pass, or fewer than
  MIN_EXAMPLES interval examples; score NULL;
- ``monosemantic``: score >= MONO_THRESHOLD (0.7: a single specific concept covers at least 70% of the unit's
  activation mass);
- ``polysemantic``: everything else.

`concepts` holds the unit's best concepts: [{"concept", "p", "p_low", "base", "llr"}, ...], specific ones first.
The same score computed on the top examples only (`top_score`) is reported alongside, since a unit can be clean at
its top and diffuse below -- the reason the whole range is used for the class. The monosemantic share (among
units that are not dead) carries a 95% bootstrap interval over units (`significance.bootstrap_ci`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.labeling.entities import EntitySet
from features.labeling.significance import bootstrap_ci
from features.store import KINDS, FeatureStore, Kind, Semantics

MIN_FIRES = 10
MIN_EXAMPLES = 5
MIN_ENRICHMENT = 4.0
MONO_THRESHOLD = 0.7
N_CONCEPTS = 5  # concepts kept per unit
WORDNET_DIRS = (Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"))

FUNCTION_WORDS = frozenset("""
a an the this that these those my your his her its our their some any no every each either neither all both
half several many much more most few fewer less least other another such what which who whom whose whatever
i me we us you he him she it they them myself yourself himself herself itself ourselves themselves one ones
and or but nor so yet for because although though while whereas if unless since until till than as whether
of in on at by to from with without within into onto upon about above below over under between among through
during before after against along across around behind beyond near off out up down toward towards via per
be am is are was were been being have has had having do does did doing will would shall should can could may
might must ought not n't 's 're 've 'd 'll 'm there here where when why how then now also just only very too
quite rather again ever never always often once yes oh
""".split())
SUFFIXES = (("ing", "-ing"), ("ed", "-ed"), ("ly", "-ly"), ("tion", "-tion"), ("sion", "-tion"), ("er", "-er"))
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
            "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
            "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
            "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
            "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
            "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
            "verb.weather", "adj.ppl"]
_WORD = re.compile(r"^[A-Za-z]+$")


# ---------------------------------------------------------------------------------------------
# Concepts of tokens


def lexical_classes(token: str, prev: str | None) -> list[str]:
    """Rule-based lexical classes of one token string (with its leading space), given the previous token."""
    text = token.strip()
    if not text:
        return ["lex:whitespace"]
    if text.replace(",", "").replace(".", "").isdigit():
        return ["lex:number"]
    if not any(ch.isalnum() for ch in text):
        return ["lex:punctuation"]
    out = []
    starts_word = token[:1].isspace() or prev is None or not (prev[-1:].isalnum())
    low = text.lower()
    if not starts_word:
        out.append("lex:word-piece")
    elif low in FUNCTION_WORDS:
        out.append("lex:function-word")
    elif text[0].isupper():
        out.append("lex:capitalised")
    if text.isalpha() and text.islower() and len(low) > 3:
        for suffix, name in SUFFIXES:
            if low.endswith(suffix):
                out.append(f"lex:{name}")
                break
        else:
            if low.endswith("s") and not low.endswith("ss"):
                out.append("lex:-s")
    return out  # a plain lower-case word gets no class: "any other word" is a remainder, not a concept


class WordNet:
    """Lexicographer-file names of a word's most frequent sense per part of speech, and the hypernyms of its most
    frequent noun and verb sense, read from a local WordNet 3.0 database (index.* and data.*); `None` from
    `find()` when none is installed."""

    POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
    RULES = {"noun": [("s", ""), ("ses", "s"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("ies", "y")],
             "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                      ("ing", "")],
             "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")], "adv": []}

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.first: dict[str, dict[str, int]] = {}  # pos -> lemma -> offset of its first sense
        self.exc: dict[str, dict[str, str]] = {}
        self.data: dict[str, Any] = {}
        for pos in self.POS:
            index: dict[str, int] = {}
            with open(folder / f"index.{pos}", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith(" "):
                        continue
                    f = line.split()
                    n = int(f[2])
                    index[f[0]] = int(f[-n])
            self.first[pos] = index
            exc: dict[str, str] = {}
            exc_file = folder / f"{pos}.exc"
            if exc_file.is_file():
                for line in exc_file.read_text(encoding="utf-8", errors="replace").splitlines():
                    f = line.split()
                    if len(f) >= 2:
                        exc[f[0]] = f[1]
            self.exc[pos] = exc
            self.data[pos] = open(folder / f"data.{pos}", "rb")  # noqa: SIM115 -- read by seek, closed in close()
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def find(cls) -> WordNet | None:
        for folder in WORDNET_DIRS:
            if all((folder / f"{k}.{pos}").is_file() for pos in cls.POS for k in ("index", "data")):
                try:
                    return cls(folder)
                except (OSError, ValueError, IndexError):
                    return None
        return None

    def close(self) -> None:
        for fh in self.data.values():
            fh.close()

    def _lemma(self, word: str, pos: str) -> str | None:
        index = self.first[pos]
        if word in index:
            return word
        if word in self.exc[pos] and self.exc[pos][word] in index:
            return self.exc[pos][word]
        for suffix, repl in self.RULES[pos]:
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                base = word[: -len(suffix)] + repl
                if base in index:
                    return base
        return None

    def _synset(self, pos: str, offset: int) -> list[bytes]:
        """The fields of one data.<pos> line: offset, lexfile number, type, word count (hex), words, pointers."""
        fh = self.data[pos]
        fh.seek(offset)
        return fh.readline().split()

    def _ancestry(self, pos: str, offset: int) -> list[str]:
        """`wn:<first lemma>.<n|v>` of the synset at `offset` and of every synset above it (hypernyms and instance
        hypernyms, along all paths)."""
        out: list[str] = []
        seen = {offset}
        todo = [offset]
        while todo:
            fields = self._synset(pos, todo.pop())
            out.append(f"wn:{fields[4].decode(errors='replace').lower()}.{self.POS[pos]}")
            at = 4 + 2 * int(fields[3], 16)
            for i in range(int(fields[at])):
                symbol, target, target_pos = fields[at + 1 + 4 * i: at + 4 + 4 * i]
                if symbol in (b"@", b"@i") and target_pos == self.POS[pos].encode() and int(target) not in seen:
                    seen.add(int(target))
                    todo.append(int(target))
        return out

    def lexnames(self, word: str) -> list[str]:
        """The word's WordNet concepts: lexnames of its most frequent sense per part of speech, and the hypernyms
        of its most frequent noun and verb sense."""
        word = word.lower()
        if word in self._cache:
            return self._cache[word]
        out = []
        for pos in self.POS:
            lemma = self._lemma(word, pos)
            if lemma is None:
                continue
            offset = self.first[pos][lemma]
            filenum = int(self._synset(pos, offset)[1])
            if 0 <= filenum < len(LEXNAMES):
                out.append("wn:" + LEXNAMES[filenum])
            if pos in ("noun", "verb"):
                out += self._ancestry(pos, offset)
        self._cache[word] = list(dict.fromkeys(out))
        return self._cache[word]


def entity_index(entity_sets: Iterable[EntitySet], encode: Callable[[str], list[int]]) -> dict[tuple[int, ...],
                                                                                              list[str]]:
    """Token-id sequences of every entity name (with and without a leading space) -> the entity's concepts."""
    index: dict[tuple[int, ...], list[str]] = {}
    for es in entity_sets:
        for i, name in enumerate(es.entities):
            concepts = [f"entity:{es.entity_type}"] + [f"{es.entity_type}.{a}={vals[i]}"
                                                       for a, vals in es.attributes.items()]
            for text in (" " + name, name):
                ids = tuple(encode(text))
                if ids:
                    bucket = index.setdefault(ids, [])
                    bucket.extend(c for c in concepts if c not in bucket)
    return index


class Concepts:
    """The concepts of every token of the store's analysed sequences, and their base rates."""

    def __init__(self, sequences: list[list[int]], vocab: list[str],
                 entities: dict[tuple[int, ...], list[str]] | None = None, wordnet: WordNet | None = None) -> None:
        self.by_token: dict[tuple[int, int], tuple[str, ...]] = {}
        counts: Counter[str] = Counter()
        self.wordnet = wordnet
        lengths = sorted({len(k) for k in entities or {}}, reverse=True)
        for s, ids in enumerate(sequences):
            strings = [vocab[i] if 0 <= i < len(vocab) else "" for i in ids]
            ent: dict[int, list[str]] = {}
            if entities:
                for p in range(len(ids)):
                    for n in lengths:
                        found = entities.get(tuple(ids[p:p + n]))
                        if found:
                            for q in range(p, min(p + n, len(ids))):
                                ent.setdefault(q, []).extend(found)
                            break
            for p, tok in enumerate(strings):
                prev = strings[p - 1] if p else None
                nxt = strings[p + 1] if p + 1 < len(strings) else None
                cs = [f"token:{tok.strip().lower() or repr(tok)}"] + lexical_classes(tok, prev)
                word = tok.strip()
                whole = (nxt is None or not nxt[:1].isalnum()) and "lex:word-piece" not in cs
                if wordnet is not None and whole and len(word) >= 3 and _WORD.match(word):
                    cs += wordnet.lexnames(word)
                cs += ent.get(p, [])
                key = tuple(dict.fromkeys(cs))
                self.by_token[(s, p)] = key
                counts.update(key)
        self.n_tokens = max(len(self.by_token), 1)
        self.base = {c: n / self.n_tokens for c, n in counts.items()}

    def of(self, seq: int, pos: int) -> tuple[str, ...]:
        return self.by_token.get((seq, pos), ())


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass
class UnitSemantics:
    """One unit's score, class and best concepts (a store `Semantics` row plus the top-only score)."""

    kind: Kind
    index: int
    score: float | None
    cls: str
    concepts: list[dict[str, Any]]
    top_score: float | None
    n_examples: int


def concept_scores(examples: list[tuple[tuple[str, ...], float]], base: dict[str, float],
                   floor: float) -> list[dict[str, Any]]:
    """P(c | fires), base rate and LLR per concept from weighted examples [(concepts, weight)], best first."""
    total = sum(w for _, w in examples)
    if total <= 0:
        return []
    n_eff = total ** 2 / sum(w * w for _, w in examples)
    mass: Counter[str] = Counter()
    for cs, w in examples:
        for c in cs:
            mass[c] += w
    out = []
    for c, m in mass.items():
        if m <= 0:
            continue
        p = min(m / total, 1.0)
        b = max(base.get(c, 0.0), floor)
        low = max(p - math.sqrt(p * (1 - p) / n_eff), 0.0)
        out.append({"concept": c, "p": round(p, 4), "p_low": round(low, 4), "base": round(b, 6),
                    "llr": round(math.log(p / b), 3)})
    specific = math.log(MIN_ENRICHMENT)
    out.sort(key=lambda d: (d["llr"] < specific, -d["p_low"], -d["llr"], d["concept"]))
    return out


def _score(concepts: list[dict[str, Any]]) -> float:
    specific = math.log(MIN_ENRICHMENT)
    return max((d["p_low"] for d in concepts if d["llr"] >= specific), default=0.0)


def unit_semantics(kind: Kind, index: int, n_fires: int, intervals: list[Any], top: list[Any],
                   concepts: Concepts, threshold: float = 0.0) -> UnitSemantics:
    """Score one unit from its interval examples (whole range) and top examples (store `Interval`/`Example`s),
    each weighted by its activation above the unit's on `threshold` (the store's; 0 for features)."""
    floor = 1.0 / concepts.n_tokens
    weighted = []
    for iv in intervals:
        if not iv.examples:
            continue
        per = iv.count / len(iv.examples)
        for e in iv.examples:
            weighted.append((concepts.of(e.seq, e.pos), per * max(float(e.value) - threshold, 0.0)))
    if n_fires < MIN_FIRES or len(weighted) < MIN_EXAMPLES:
        why = f"too rare: {n_fires} firings, {len(weighted)} interval examples"
        return UnitSemantics(kind, index, None, "dead", [{"concept": why}], None, len(weighted))
    ranked = concept_scores(weighted, concepts.base, floor)
    score = _score(ranked)
    top_ranked = concept_scores([(concepts.of(e.seq, e.pos), max(float(e.value) - threshold, 0.0)) for e in top],
                                concepts.base, floor)
    cls = "monosemantic" if score >= MONO_THRESHOLD else "polysemantic"
    return UnitSemantics(kind, index, round(score, 4), cls, ranked[:N_CONCEPTS],
                         round(_score(top_ranked), 4) if top_ranked else None, len(weighted))


def score_store(store: FeatureStore, entity_sets: list[EntitySet], encode: Callable[[str], list[int]] | None,
                wordnet: bool = True, kinds: Iterable[Kind] = KINDS,
                log: Callable[[str], None] = print) -> tuple[list[UnitSemantics], dict[str, Any]]:
    """Monosemanticity of every unit of the store's kinds; returns the rows and a summary for the report."""
    n_seq = int(store.meta.get("n_sequences", 0))
    sequences = [store.sequence(s) for s in range(n_seq)]
    wn = WordNet.find() if wordnet else None
    ents = entity_index(entity_sets, encode) if encode is not None and entity_sets else None
    concepts = Concepts(sequences, store.vocab, ents, wn)
    if wn is not None:
        wn.close()
    rows: list[UnitSemantics] = []
    for kind in kinds:
        n = store.n_units(kind)
        for i in range(n):
            u = store.unit(kind, i)
            rows.append(unit_semantics(kind, i, u.n_fires, u.intervals, u.top_examples, concepts, u.threshold))
        if n:
            log(f"semantics: {n} {kind}s scored")
    summary = summarise(rows)
    summary["wordnet"] = str(wn.folder) if wn is not None else None
    summary["on_rule"] = store.meta.get("analysis", {}).get("on_rule")
    summary["entity_concepts"] = ents is not None
    summary["n_tokens"] = concepts.n_tokens
    return rows, summary


def summarise(rows: list[UnitSemantics]) -> dict[str, Any]:
    """Per kind: counts per class, the monosemantic share among units that are not dead (with its 95% bootstrap
    interval over those units), mean scores."""
    out: dict[str, Any] = {"thresholds": {"min_fires": MIN_FIRES, "min_examples": MIN_EXAMPLES,
                                          "min_enrichment": MIN_ENRICHMENT, "mono_threshold": MONO_THRESHOLD}}
    for kind in KINDS:
        rs = [r for r in rows if r.kind == kind]
        if not rs:
            continue
        alive = [r for r in rs if r.cls != "dead"]
        counts = Counter(r.cls for r in rs)
        top = [r.top_score for r in alive if r.top_score is not None]
        kinds_of = Counter(concept_family(r.concepts[0]["concept"]) for r in alive
                           if r.cls == "monosemantic" and r.concepts)
        out[kind] = {"n": len(rs), "classes": dict(counts),
                     "mono_share": counts["monosemantic"] / len(alive) if alive else None,
                     "mono_share_ci": bootstrap_ci([r.cls == "monosemantic" for r in alive]).as_list()
                     if alive else None,
                     "mean_score": sum(r.score or 0 for r in alive) / len(alive) if alive else None,
                     "mono_share_top": sum(t >= MONO_THRESHOLD for t in top) / len(top) if top else None,
                     "scores": [r.score for r in alive], "mono_concept_kinds": dict(kinds_of)}
    return out


def concept_family(concept: str) -> str:
    """'token', 'lex', 'wn', 'entity' or 'attribute' (an entity-attribute value)."""
    return concept.split(":", 1)[0] if ":" in concept else "attribute"


def to_store_rows(rows: list[UnitSemantics]) -> list[Semantics]:
    return [Semantics(r.kind, r.index, r.score, r.cls, r.concepts) for r in rows]
