"""Text sources -> fixed-length token sequences, and the embedded default corpus.

A corpus source is one of:

- ``"embedded"``: the corpus shipped in ``sae/data/corpus/`` (6.3M words of English prose from six
  public sources; see PROVENANCE.md there), read streaming from the .xz file.
- a ``.txt`` file: one document. A line holding only ``<|endoftext|>`` starts a new document, so one
  file can hold many.
- a ``.jsonl`` or ``.jsonl.gz`` file: one JSON object per line, the document in its ``"text"`` field.
- a folder of such files: read recursively, sorted by relative path.
- a Hugging Face dataset folder written by ``save_to_disk`` (needs ``pip install datasets``); its
  ``text`` column, from the ``train`` split of a DatasetDict.

Documents are tokenised, joined with a separator token and cut into consecutive sequences; a seeded
hash of each sequence's index puts it in the train or held-out split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.errors import SaekitError
from sae.io import sha256_file

DEFAULT_CORPUS = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "corpus"
DOCUMENT_BREAK = "<|endoftext|>"
ACCEPTED = ("'embedded', a .txt file, a .jsonl or .jsonl.gz file with a 'text' field, a folder of such files, "
            "or a Hugging Face dataset folder written by save_to_disk")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHARS_PER_TOKEN = 5  # a slight overestimate for English, so an early stop rarely needs a second batch
_MAX_BATCH_CHARS = 1 << 20


# ---------------------------------------------------------------- reading documents


def embedded_manifest() -> dict[str, Any]:
    """The shipped corpus's manifest: sha256 of the .xz, and documents / words / tokens per source."""
    path = EMBEDDED_DIR / "manifest.json"
    if not path.is_file():
        raise SaekitError(f"the embedded corpus is missing from this installation ({path}); reinstall saekit")
    return json.loads(path.read_text(encoding="utf-8"))


def iter_embedded_records() -> Iterator[dict[str, str]]:
    """The shipped corpus as ``{"source", "genre", "title", "text"}`` dicts, in its interleaved order."""
    path = EMBEDDED_DIR / embedded_manifest()["file"]
    if not path.is_file():
        raise SaekitError(f"the embedded corpus is missing from this installation ({path}); reinstall saekit")
    return _embedded_records(path)


def _embedded_records(path: Path) -> Iterator[dict[str, str]]:
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _read_txt(path: Path) -> Iterator[str]:
    """Streams line by line, so a large file of many documents never sits in memory whole."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip() == DOCUMENT_BREAK:
                    yield "".join(lines)
                    lines = []
                else:
                    lines.append(line)
    except UnicodeDecodeError as e:
        raise SaekitError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert the file to UTF-8") from None
    yield "".join(lines)


def _read_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SaekitError(f"{path}, line {number}: not valid JSON ({e.msg}); each line must be one "
                                      'JSON object such as {"text": "..."}') from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SaekitError(f"{path}, line {number}: no string 'text' field; each line must be one "
                                      'JSON object such as {"text": "..."}')
                yield record["text"]
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise SaekitError(f"{path}: cannot be read as {'gzipped ' if opener is gzip.open else ''}UTF-8 JSON "
                          f"lines ({e}); check the file") from None


def _read_file(path: Path) -> Iterator[str]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path)
    if path.suffix == ".txt":
        return _read_txt(path)
    raise SaekitError(f"corpus file {path} has an unsupported type; accepted: {ACCEPTED}")


def _text_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".txt", ".jsonl", ".jsonl.gz"))),
                  key=lambda p: p.relative_to(folder).as_posix())


def _read_hf_dataset(folder: Path) -> Iterator[str]:
    """Imports ``datasets`` only here: it is optional, and heavy to import."""
    try:
        import datasets
    except ImportError:
        raise SaekitError(f"{folder} is a Hugging Face dataset; reading it needs the datasets package: "
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise SaekitError(f"{folder}: the dataset has splits {sorted(ds)} and none is 'train'; "
                              f"pass one split's folder instead, e.g. {folder / sorted(ds)[0]}")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" not in ds.column_names:
        raise SaekitError(f"{folder}: the dataset has no 'text' column (it has {ds.column_names}); "
                          "rename the column holding the documents to 'text'")
    return (text for batch in ds.select_columns(["text"]).iter(batch_size=1000)
            for text in batch["text"] if isinstance(text, str))


def _open_source(source: str | Path) -> Iterator[str]:
    if str(source) == DEFAULT_CORPUS:
        return (record["text"] for record in iter_embedded_records())
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return _read_hf_dataset(path)
        files = _text_files(path)
        if not files:
            raise SaekitError(f"corpus folder {path} holds no .txt, .jsonl or .jsonl.gz files; accepted: {ACCEPTED}")
        return chain.from_iterable(_read_file(f) for f in files)
    raise SaekitError(f"corpus source '{source}' does not exist; accepted: {ACCEPTED}")


def iter_documents(source: str | Path) -> Iterator[str]:
    """Yield the non-blank documents of a corpus source, stripped, in order (see the module docstring).

    Checks eagerly (up to the first document) so a bad source fails here, not deep inside a stage.
    """
    documents = (doc.strip() for doc in _open_source(source))
    for doc in documents:
        if doc:
            return chain([doc], (d for d in documents if d))
    raise SaekitError(f"corpus source '{source}' holds no text (every document is blank); point corpus.source "
                      "at a corpus with text, or use 'embedded'")


# ---------------------------------------------------------------- token sequences


def default_separator_id(tokenizer: Any) -> int:
    """``<|endoftext|>`` if the vocabulary has it (SmolLM2's pretraining document separator; its eos is
    the chat token ``<|im_end|>``), else eos, else bos."""
    token_id = tokenizer.convert_tokens_to_ids(DOCUMENT_BREAK)
    if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == DOCUMENT_BREAK:
        return token_id  # (an unknown token maps to unk's id, which is why the round trip is checked)
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise SaekitError("the tokenizer has no <|endoftext|>, eos or bos token to separate documents; "
                      "pass separator_id explicitly")


def _take(documents: Iterator[str], max_chars: int) -> list[str]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars or len(batch) >= 1024:
            break
    return batch


def _encode(tokenizer: Any, batch: list[str]) -> list[list[int]]:
    """Token ids without special tokens. A fast tokenizer's Rust backend is called directly when it
    offers ``encode_batch_fast`` (no offsets): the same ids as ``tokenizer(batch)``, about twice as fast."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
    return tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenize_sequences(documents: Iterable[str], tokenizer: Any, context_size: int = 128,
                       max_sequences: int | None = None, separator_id: int | None = None) -> torch.Tensor:
    """Tokenise documents, join them with ``separator_id`` between documents, and cut the stream into
    consecutive ``[n_seq, context_size]`` int32 sequences (the final partial one is dropped).

    Documents go to the fast tokenizer in batches sized to what is still needed, so a run capped by
    ``max_sequences`` tokenises only a little more text than it uses.
    """
    if context_size < 1:
        raise SaekitError(f"context_size must be at least 1, got {context_size}")
    if max_sequences is not None and max_sequences < 1:
        raise SaekitError(f"max_sequences must be at least 1 (or None for the whole corpus), got {max_sequences}")
    separator = np.array([default_separator_id(tokenizer) if separator_id is None else separator_id], np.int32)
    docs = iter(documents)
    chunks: list[np.ndarray] = []
    carry = np.empty(0, np.int32)
    n_done, n_tokens, first_document = 0, 0, True
    while max_sequences is None or n_done < max_sequences:
        wanted = _MAX_BATCH_CHARS if max_sequences is None else \
            ((max_sequences - n_done) * context_size - len(carry)) * _CHARS_PER_TOKEN
        batch = _take(docs, min(max(wanted, 4096), _MAX_BATCH_CHARS))
        if not batch:
            break
        parts = [carry]
        for ids in _encode(tokenizer, batch):
            if not first_document:
                parts.append(separator)
            parts.append(np.asarray(ids, np.int32))
            first_document = False
        stream = np.concatenate(parts)
        n_tokens += len(stream) - len(carry)
        n_new = len(stream) // context_size
        if max_sequences is not None:
            n_new = min(n_new, max_sequences - n_done)
        chunks.append(stream[:n_new * context_size].reshape(n_new, context_size))
        carry = stream[n_new * context_size:]
        n_done += n_new
    if n_done == 0:
        raise SaekitError(f"the corpus holds only {n_tokens} tokens, fewer than one sequence of {context_size}; "
                          "add text or lower corpus.context_size")
    return torch.from_numpy(np.concatenate(chunks))


def held_out_mask(n_sequences: int, held_out_fraction: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Bool mask over sequence indices: index ``i`` is held out iff the first 8 bytes of
    ``sha256(f"{seed}:{i}")``, read as a big-endian integer and divided by 2**64, are below the fraction.

    The rule depends only on (seed, i), so adding sequences never moves existing ones between splits.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise SaekitError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    cut = int(held_out_fraction * 2**64)
    return torch.tensor([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") < cut
                         for i in range(n_sequences)], dtype=torch.bool)


def split_sequences(tokens: torch.Tensor, held_out_fraction: float = 0.05,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, held_out) split of ``[n_seq, ctx]`` sequences by ``held_out_mask``."""
    mask = held_out_mask(len(tokens), held_out_fraction, seed)
    return tokens[~mask], tokens[mask]


# ---------------------------------------------------------------- fingerprints


def _content_hash(source: str | Path) -> str:
    """The embedded corpus by its manifest's sha256; a file or folder by the sha256 of its contents,
    so copying or touching files does not change it but editing them does."""
    if str(source) == DEFAULT_CORPUS:
        return f"embedded:{embedded_manifest()['sha256']}"
    path = Path(source).expanduser()
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise SaekitError(f"corpus source '{source}' does not exist; accepted: {ACCEPTED}")
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def corpus_fingerprint(source: str | Path, tokenizer_name: str, context_size: int, n_sequences: int | None,
                       held_out_fraction: float = 0.0, seed: int = 0, separator_id: int | None = None) -> str:
    """A short stable hash of everything that decides which token sequences a run is built from."""
    described = {"format": 1, "content": _content_hash(source), "tokenizer": tokenizer_name,
                 "context_size": context_size, "n_sequences": n_sequences, "held_out_fraction": held_out_fraction,
                 "seed": seed, "separator_id": separator_id}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def token_fingerprint(tokens: torch.Tensor) -> str:
    """A short hash of the exact token ids (and their shape and dtype)."""
    array = tokens.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()[:16]
