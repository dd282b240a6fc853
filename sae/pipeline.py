"""The run's stages as plain functions over one run directory (`runs/<name>/`).

Each stage reads the previous stage's artifact from disk, so any stage can be rerun alone and an
interrupted stage resumes from what is already there.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformer_lens import HookedTransformer

from sae import corpus
from sae.cache import hook_dir, write_cache
from sae.config import RunConfig, save_config
from sae.io import atomic_save_tensors
from sae.models import load_model, validate_hooks

TOKENS_FILE = "tokens.safetensors"


def say(msg: str) -> None:
    print(f"[saekit] {msg}", flush=True)


def run_model(cfg: RunConfig) -> HookedTransformer:
    t0 = time.perf_counter()
    model = load_model(cfg.model.name, cfg.model.device)
    say(f"model {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"d_mlp {model.cfg.d_mlp} ({time.perf_counter() - t0:.1f}s)")
    return model


def prepare_tokens(cfg: RunConfig, model: HookedTransformer) -> dict[str, torch.Tensor]:
    """Tokenise the corpus into train / held-out sequences once per run, kept in tokens.safetensors."""
    path = cfg.run_dir / TOKENS_FILE
    c = cfg.corpus
    fingerprint = corpus.corpus_fingerprint(c.source, model.cfg.model_name, c.context_size, c.max_sequences,
                                            c.held_out_fraction, c.seed)
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") == fingerprint:
                return {k: fh.get_tensor(k) for k in fh.keys()}
    t0 = time.perf_counter()
    say(f"tokenising corpus '{c.source}' into sequences of {c.context_size} tokens"
        + (f" (up to {c.max_sequences:,})" if c.max_sequences else ""))
    tokens = corpus.tokenize_sequences(corpus.iter_documents(c.source), model.tokenizer, c.context_size,
                                       max_sequences=c.max_sequences)
    train, held_out = corpus.split_sequences(tokens, c.held_out_fraction, c.seed)
    out = {"train": train.contiguous(), "held_out": held_out.contiguous()}
    atomic_save_tensors(path, out, metadata={"fingerprint": fingerprint, "source": c.source})
    say(f"{len(train):,} train and {len(held_out):,} held-out sequences ({train.numel():,} train tokens, "
        f"{time.perf_counter() - t0:.1f}s) -> {path}")
    return out


def stage_cache(cfg: RunConfig, model: HookedTransformer, overwrite: bool = False) -> dict[str, Path]:
    """Cache every configured hook over the train split."""
    validate_hooks(model, cfg.cache.hooks)
    tokens = prepare_tokens(cfg, model)
    train = tokens["train"]
    fingerprint = corpus.token_fingerprint(train)
    cache_dir = cfg.run_dir / "cache"
    say(f"caching {', '.join(cfg.cache.hooks)} over {train.numel():,} tokens ({cfg.cache.dtype}) -> {cache_dir}")
    t0 = time.perf_counter()
    folders = write_cache(model, train, cfg.cache.hooks, cache_dir, corpus_fingerprint=fingerprint,
                          dtype=cfg.cache.dtype, batch_size=cfg.cache.batch_size,
                          shard_sequences=cfg.cache.shard_sequences, overwrite=overwrite)
    say(f"cache complete ({time.perf_counter() - t0:.0f}s): " + ", ".join(str(hook_dir(cache_dir, h)) for h in folders))
    return folders


def sae_dirs(cfg: RunConfig) -> list[Path]:
    return [cfg.run_dir / "saes" / spec.sae_id for spec in cfg.train.saes]


def stage_train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Train the configured SAEs; in a pipeline run, finished work is skipped and unfinished work resumed."""
    from sae.train import CHECKPOINT_FILE, checkpoint_step, train

    ckpt = cfg.run_dir / "checkpoints" / CHECKPOINT_FILE
    total = cfg.train.total_tokens // cfg.train.batch_size
    step = checkpoint_step(ckpt)
    if step == total and not overwrite and all((d / "cfg.json").is_file() for d in sae_dirs(cfg)):
        say(f"SAEs already trained ({total} steps): " + ", ".join(str(d) for d in sae_dirs(cfg)))
        return sae_dirs(cfg)
    say(f"training {len(cfg.train.saes)} SAE(s) on {cfg.train.total_tokens:,} tokens in batches of "
        f"{cfg.train.batch_size:,}" + (f", resuming at step {step}" if resume and step else ""))
    t0 = time.perf_counter()
    out = train(cfg, resume=resume, overwrite=overwrite)
    say(f"trained in {time.perf_counter() - t0:.0f}s -> " + ", ".join(str(d) for d in out))
    return out


def stage_eval(cfg: RunConfig, model: HookedTransformer) -> list[dict]:
    """Evaluate every trained SAE on the held-out split; writes saes/<id>/eval.json."""
    from sae.evaluate import evaluate
    from sae.export import load_sae

    held_out = prepare_tokens(cfg, model)["held_out"]
    results = []
    for folder in sae_dirs(cfg):
        sae = load_sae(folder)
        say(f"evaluating {folder.name} on {len(held_out):,} held-out sequences "
            f"(CE loss on {min(cfg.eval.sequences, len(held_out))})")
        res = evaluate(model, sae, held_out, cfg.eval.sequences, cfg.eval.batch_size, folder / "eval.json")
        say(f"{folder.name}: L0 {res['l0']:.1f} | FVU {res['fvu']:.3f} | CE loss recovered "
            f"{res['ce_loss_recovered']:.3f} | KL {res['kl_div']:.3f} | dead {res['dead_fraction']:.1%} "
            f"| dense {res['dense_fraction']:.1%}")
        results.append(res)
    return results


def stage_analyze(cfg: RunConfig, model: HookedTransformer, overwrite: bool = False,
                  sae_folders: list[Path] | None = None) -> list[Path]:
    """Analyse every SAE's features and its layer's neurons into saes/<id>/features.db (skipped when current)."""
    from features.analyze import run_analysis, select_tokens
    from features.store import FeatureStore, density_note

    splits = prepare_tokens(cfg, model)
    n_tokens = select_tokens(splits, cfg.analyze)[0].numel()
    paths = []
    for folder in sae_folders or sae_dirs(cfg):
        say(f"analysing {folder.name}: features and {'neurons' if cfg.analyze.neurons else 'no neurons'} over "
            f"{n_tokens:,} tokens ({cfg.analyze.split})")
        t0 = time.perf_counter()
        path, built = run_analysis(cfg, model, folder, splits, overwrite=overwrite)
        with FeatureStore.open(path) as store:
            units = store.summary()["units"]
        counts = " | ".join(f"{kind}s: {c['live']:,} live, {c['dead']:,} dead, {c['dense']:,} dense"
                            + (f" ({note})" if (note := density_note(c)) else "") for kind, c in units.items())
        how = f"built in {time.perf_counter() - t0:.0f}s" if built else "up to date"
        say(f"feature store {path} ({how}): {counts}")
        paths.append(path)
    return paths


def stage_label(cfg: RunConfig, model: HookedTransformer, sae_folders: list[Path] | None = None) -> list[Path]:
    """Label each SAE's features and neurons with entity attributes (tags, probes, causal checks, semantics) into
    its feature store; reports go to runs/<name>/reports/<sae-id>/label.md. Needs `stage_analyze` first."""
    from features.label import run_label
    from features.report import headline

    if sae_folders is None:
        sae_folders = [cfg.run_dir / "saes" / cfg.label.sae] if cfg.label.sae else sae_dirs(cfg)
    reports = []
    for folder in sae_folders:
        say(f"labeling {folder.name} with entity attributes ({cfg.label.entities} entity sets)")
        t0 = time.perf_counter()
        result, semantics, report = run_label(cfg, model, folder, log=lambda m: say(m))
        h = headline(result, semantics)
        parts = []
        for kind in ("feature", "neuron"):
            if kind in h:
                d = h[kind]
                mono = f", {d['mono_share']:.1%} monosemantic" if d.get("mono_share") is not None else ""
                parts.append(f"{kind}s: {d['tags']} tags on {d['attributes_tagged']}/{d['attributes']} attributes, "
                             f"{d['causal']}/{d['tested']} causal{mono}")
        say(f"labeled in {time.perf_counter() - t0:.0f}s: " + "; ".join(parts) + f" -> {report}")
        reports.append(report)
    return reports


def start_run(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
