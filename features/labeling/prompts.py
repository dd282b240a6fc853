"""Entity prompts as token ids: where the entity's tokens are, and batches of similar length.

Everything the labeler reads is at the entity's tokens, so each prompt carries its entity span; batching by
length keeps right padding (and wasted forward work) small.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.entities import PLACEHOLDER
from sae.errors import SaekitError


class Encoded(NamedTuple):
    """A prompt's token ids and the entity's tokens ids[span[0]:span[1]]."""

    ids: list[int]
    span: tuple[int, int]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without the tokenizer's special tokens (prompts add their own start token)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, template: str, entity: str, start_id: int | None) -> Encoded:
    """Fill `template` with `entity` and tokenise it, locating the entity's tokens (its last occurrence).

    The prefix before the entity is tokenised without its trailing space, which belongs to the entity's first
    token in byte-level BPE (" Kenya"). Should a tokenizer merge across the boundary, the span falls back to the
    last token of the text up to the entity's end.
    """
    cut = template.rfind(PLACEHOLDER)
    before = template[:cut].replace(PLACEHOLDER, entity)
    text = before + entity + template[cut + len(PLACEHOLDER):].replace(PLACEHOLDER, entity)
    ids = encode_text(tokenizer, text)
    upto = encode_text(tokenizer, before + entity)
    pre = encode_text(tokenizer, before.rstrip())
    if ids[:len(upto)] == upto and upto[:len(pre)] == pre and len(upto) > len(pre):
        span = (len(pre), len(upto))
    else:
        span = (max(len(upto) - 1, 0), max(len(upto), 1))
    if start_id is not None:
        return Encoded([start_id, *ids], (span[0] + 1, span[1] + 1))
    return Encoded(ids, span)


def first_token(tokenizer: Any, answer: str) -> int:
    """The answer's first token: the knowledge filter and the causal checks read its log-probability."""
    ids = encode_text(tokenizer, answer)
    if not ids:
        raise SaekitError(f"the answer {answer!r} tokenises to nothing; fix the value or its answer_prefix")
    return ids[0]


def length_batches(prompts: list[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts in batches of similar length (sorted by length, then by index)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].ids), i))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def padded_batch(prompts: list[Encoded], idx: list[int], device: Any) -> tuple[Tensor, Tensor]:
    """The batch's token ids, right-padded with each row's last token, and each row's last position.

    Right padding needs no attention mask: attention is causal, so padding after a prompt's end never reaches
    the prompt's own positions, and rotary positions still count from the prompt's first token."""
    longest = max(len(prompts[i].ids) for i in idx)
    rows = [prompts[i].ids + [prompts[i].ids[-1]] * (longest - len(prompts[i].ids)) for i in idx]
    last = torch.tensor([len(prompts[i].ids) - 1 for i in idx])
    return torch.tensor(rows, device=device), last
