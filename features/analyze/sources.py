"""Where the pass's tokens and activations come from: which sequences, and either the model run to the SAE's
layer or the rows an activation cache already holds for them (the same numbers, no forward pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from features.analyze.config import AnalyzeConfig
from sae.cache import CacheReader, hook_dir
from sae.errors import SaekitError
from sae.hooks import neuron_hook, run_to
from sae.saes import SAE

# (first sequence index, {hook: activations [batch tokens, d]}) per batch, covering the tokens in order
Batches = Iterable[tuple[int, dict[str, Tensor]]]
SPLIT_ORDER = {"held_out": ["held_out"], "train": ["train"], "held_out+train": ["held_out", "train"]}


def select_tokens(splits: dict[str, Tensor], cfg: AnalyzeConfig) -> tuple[Tensor, list[tuple[str, int]]]:
    """The analysed sequences: the configured split(s) in order, held-out first, capped at cfg.sequences."""
    parts, sources = [], []
    left = cfg.sequences
    for name in SPLIT_ORDER[cfg.split]:
        t = splits[name] if left is None else splits[name][:left]
        parts.append(t)
        sources += [(name, i) for i in range(len(t))]
        if left is not None:
            left -= len(t)
    tokens = torch.cat(parts)
    if len(tokens) == 0:
        raise SaekitError(f"no sequences to analyse: split '{cfg.split}' is empty; raise corpus.max_sequences or "
                          "corpus.held_out_fraction, or set analyze.split: held_out+train")
    return tokens, sources


def analysed_hooks(sae: SAE, neurons: bool) -> list[str]:
    """The hooks the pass reads: the SAE's input and (neurons) the MLP neurons of its layer."""
    read = sae.provenance.hook_name
    return list(dict.fromkeys([read] + ([neuron_hook(read)] if neurons else [])))


def model_batches(model: HookedTransformer, tokens: Tensor, hooks: list[str],
                  batch_size: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Batches from the model, run only to the deepest hook's layer."""
    for start in range(0, len(tokens), batch_size):
        acts = run_to(model, tokens[start:start + batch_size], hooks)
        yield start, {h: a.reshape(-1, a.shape[-1]).cpu() for h, a in acts.items()}


def cache_batches(cache_dir: Path, hooks: list[str], *, model_name: str, train_fingerprint: str, n_seq: int,
                  ctx: int, batch_size: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Batches read from an activation cache of the train split (its first n_seq sequences). Raises a
    SaekitError saying why when the cache cannot serve them (a hook missing, another model or corpus)."""
    readers = {}
    for hook in hooks:
        folder = hook_dir(cache_dir, hook)
        if not folder.is_dir():
            raise SaekitError(f"the cache has no {hook} (add it to cache.hooks and rerun `saekit cache`)")
        readers[hook] = CacheReader(folder, expect={"model": model_name, "corpus_fingerprint": train_fingerprint,
                                                    "context_size": ctx})

    def read() -> Iterator[tuple[int, dict[str, Tensor]]]:
        for start in range(0, n_seq, batch_size):
            rows = np.arange(start * ctx, min(n_seq, start + batch_size) * ctx)
            yield start, {h: r.activations(rows) for h, r in readers.items()}

    return read()
