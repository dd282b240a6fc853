"""The analysis stage's entry point: analyse one SAE directory into the store file it is given, unless that
store is already up to date. Which run the paths belong to is the caller's business.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor
from transformer_lens import HookedTransformer

from features.analyze.analysis import analyze
from features.analyze.config import AnalyzeConfig
from features.analyze.records import write_analysis
from features.analyze.sources import Batches, analysed_hooks, cache_batches, select_tokens
from features.store import FeatureStore, read_fingerprint
from sae.corpus import token_fingerprint
from sae.errors import SaekitError
from sae.formats import CFG_FILE, SPARSITY_FILE, load_sae
from sae.hooks import check_fit
from sae.io import sha256_file
from sae.saes import SAE


def sae_fingerprint(sae_dir: Path) -> str:
    """sha256 over the SAE's weight files: the identity the labeler's tables belong to."""
    weights = sorted(p for p in Path(sae_dir).glob("*.safetensors") if p.name != SPARSITY_FILE)
    return hashlib.sha256("".join(sha256_file(p) for p in weights).encode()).hexdigest()


def input_fingerprint(sae_sha: str, tokens: Tensor, cfg: AnalyzeConfig, model_name: str) -> str:
    """What a store was built from: SAE weights, tokens, analysis settings, model. Equal means up to date."""
    parts = [sae_sha, token_fingerprint(tokens), json.dumps(asdict(cfg), sort_keys=True), model_name]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def vocab_strings(model: HookedTransformer) -> list[str]:
    """Each token id's text, as the store shows it (placeholders where the model has no tokenizer)."""
    n = model.cfg.d_vocab
    tok = model.tokenizer
    if tok is None:
        return [f"<{i}>" for i in range(n)]
    known = min(n, len(tok))
    return list(tok.batch_decode([[i] for i in range(known)])) + [f"<{i}>" for i in range(known, n)]


def run_analysis(model: HookedTransformer, sae_dir: Path, store: Path, splits: dict[str, Tensor],
                 cfg: AnalyzeConfig, *, cache_dir: Path | None = None, meta: dict[str, Any] | None = None,
                 overwrite: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Analyse the SAE in `sae_dir` over the sequences `cfg` picks from `splits` and write the store at `store`;
    (store, False) without work when it is already built from the same SAE, tokens, settings and model, unless
    `overwrite`. `cache_dir` is the activation cache (one folder per hook) analyze.source may read instead of
    running the model; `meta` (e.g. eval metrics, the run config) is recorded as is, and refreshed in an
    up-to-date store without a rebuild."""
    sae_dir, store, meta = Path(sae_dir), Path(store), meta or {}
    sae = load_sae(sae_dir)
    check_fit(model, sae)
    tokens, sources = select_tokens(splits, cfg)
    sae_sha = sae_fingerprint(sae_dir)
    fingerprint = input_fingerprint(sae_sha, tokens, cfg, model.cfg.model_name)
    if not overwrite and read_fingerprint(store) == fingerprint:
        with FeatureStore.open(store, writable=True) as old:
            changed = {k: v for k, v in meta.items() if old.meta.get(k) != v}
            if changed:
                old.set_meta(changed)
        return store, False
    cached = _cached_batches(model, sae, cfg, tokens, sources, cache_dir, splits)
    analysis = analyze(model, sae, tokens, cfg, sources, cached, progress=progress)
    analysis.settings["source"] = "model" if cached is None else "cache"
    write_analysis(store, analysis, vocab=vocab_strings(model), meta={
        "sae_id": sae_dir.name, "model_name": model.cfg.model_name, "fingerprint": fingerprint,
        "sae_sha256": sae_sha, "sae": json.loads((sae_dir / CFG_FILE).read_text()), **meta})
    return store, True


def _cached_batches(model: HookedTransformer, sae: SAE, cfg: AnalyzeConfig, tokens: Tensor,
                    sources: list[tuple[str, int]], cache_dir: Path | None,
                    splits: dict[str, Tensor]) -> Batches | None:
    """The activation cache's batches when analyze.source allows it and the cache holds these sequences, else
    None (run the model); with analyze.source 'cache', why it cannot serve is an error."""
    if cfg.source == "model":
        return None
    if any(split != "train" for split, _ in sources):
        reason = ("the analysed sequences include held-out ones and the cache holds the train split only (set "
                  "analyze.split: train)")
    elif cache_dir is None:
        reason = "no activation cache folder was given"
    else:
        try:
            return cache_batches(cache_dir, analysed_hooks(sae, cfg.neurons), model_name=model.cfg.model_name,
                                 train_fingerprint=token_fingerprint(splits["train"]), n_seq=len(tokens),
                                 ctx=tokens.shape[1], batch_size=cfg.batch_size)
        except SaekitError as exc:
            reason = str(exc)
    if cfg.source == "cache":
        raise SaekitError(f"analyze.source is 'cache' but {reason}; or set analyze.source: auto")
    return None
