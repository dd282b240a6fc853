"""The run's stages as plain functions over one run directory; the only layer that knows a whole RunConfig.

Each stage reads the previous stage's artifact from disk (paths from `RunLayout`), so any stage can be
rerun alone and an interrupted stage resumes from what is already there. The stages themselves live
below: `sae.cache`, `sae.trainer`, `sae.evaluate`, `features.analyze`, `features.labeling`,
`features.report`; this module only wires them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from features.layout import store_in
from features.run_config import RunConfig, save_config
from sae import corpus
from sae.io import atomic_save_tensors

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def say(msg: str) -> None:
    print(f"[saekit] {msg}", flush=True)


def model_device(device: str) -> str:
    """`model.device`, except that under torchrun with GPUs each process takes its own (LOCAL_RANK's, which
    `dist_info` made current): 8 processes asking for "cuda" must not all land on GPU 0."""
    from sae.distributed import dist_info

    _, world = dist_info()
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def run_model(cfg: RunConfig) -> HookedTransformer:
    from sae.models import load_model

    t0 = time.perf_counter()
    model = load_model(cfg.model.name, model_device(cfg.model.device))
    say(f"model {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"d_mlp {model.cfg.d_mlp} ({time.perf_counter() - t0:.1f}s)")
    return model


def start_run(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.layout.config)


def prepare_tokens(cfg: RunConfig, model: HookedTransformer) -> dict[str, torch.Tensor]:
    """Tokenise the corpus into train / held-out sequences once per run, kept in the run's token file."""
    path = cfg.layout.tokens
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


def train_tokens(cfg: RunConfig, model: HookedTransformer) -> torch.Tensor:
    """The train split; under torchrun rank 0 tokenises (and writes the token file) while the others wait,
    then they read its file, so every process holds the same sequences."""
    import torch.distributed as dist

    from sae.distributed import dist_info

    rank, world = dist_info()
    if world > 1 and rank > 0:
        dist.barrier()
    train = prepare_tokens(cfg, model)["train"]
    if world > 1 and rank == 0:
        dist.barrier()
    return train


def stage_cache(cfg: RunConfig, model: HookedTransformer, overwrite: bool = False) -> dict[str, Path]:
    """Cache every configured hook over the train split; under torchrun each process writes its own shards
    and rank 0 merges the manifests (`sae.cache`)."""
    from sae.cache import write_cache
    from sae.distributed import dist_info
    from sae.hooks import validate_hooks

    validate_hooks(model, cfg.cache.hooks)
    ranks = dist_info()
    train = train_tokens(cfg, model)
    cache_dir = cfg.layout.cache_dir
    who = f" with {ranks[1]} processes" if ranks[1] > 1 else ""
    say(f"caching {', '.join(cfg.cache.hooks)} over {train.numel():,} tokens ({cfg.cache.dtype}){who} -> {cache_dir}")
    t0 = time.perf_counter()
    folders = write_cache(model, train, cfg.cache.hooks, cache_dir, corpus_fingerprint=corpus.token_fingerprint(train),
                          dtype=cfg.cache.dtype, batch_size=cfg.cache.batch_size,
                          shard_sequences=cfg.cache.shard_sequences, overwrite=overwrite, ranks=ranks)
    say(f"cache complete ({time.perf_counter() - t0:.0f}s): " + ", ".join(str(p) for p in folders.values()))
    return folders


def sae_dirs(cfg: RunConfig) -> list[Path]:
    return [cfg.layout.sae(spec.sae_id) for spec in cfg.train.saes]


def stage_train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                model: HookedTransformer | None = None) -> list[Path]:
    """Train the configured SAEs from the cache, or on the fly from `model` (loaded when not given) with
    `train.source: model`; in a pipeline run, finished work is skipped and unfinished work resumed."""
    from features.training import train_from_cache, train_from_model
    from sae.checkpoint import checkpoint_step
    from sae.formats import CFG_FILE

    total = cfg.train.total_tokens // cfg.train.batch_size
    step = checkpoint_step(cfg.layout.checkpoint)
    if step == total and not overwrite and all((d / CFG_FILE).is_file() for d in sae_dirs(cfg)):
        say(f"SAEs already trained ({total} steps): " + ", ".join(str(d) for d in sae_dirs(cfg)))
        return sae_dirs(cfg)
    say(f"training {len(cfg.train.saes)} SAE(s) on {cfg.train.total_tokens:,} tokens in batches of "
        f"{cfg.train.batch_size:,}" + (f", resuming at step {step}" if resume and step else ""))
    t0 = time.perf_counter()
    if cfg.train.source == "model":
        model = model or run_model(cfg)
        say(f"on the fly: {model.cfg.model_name} forwards the train split into a shuffle buffer of "
            f"{cfg.train.buffer_tokens:,} tokens (no cache)")
        out = train_from_model(cfg, model, train_tokens(cfg, model), cfg.train.buffer_tokens, cfg.train.streams,
                               resume=resume, overwrite=overwrite)
    else:
        out = train_from_cache(cfg, resume=resume, overwrite=overwrite)
    if out:  # rank 0 exports; other ranks return nothing
        say(f"trained in {time.perf_counter() - t0:.0f}s -> " + ", ".join(str(d) for d in out))
    return out


def stage_eval(cfg: RunConfig, model: HookedTransformer) -> list[dict]:
    """Evaluate every trained SAE on the held-out split; writes each SAE's eval.json."""
    from sae.evaluate import evaluate_sae
    from sae.formats import load_sae

    held_out = prepare_tokens(cfg, model)["held_out"]
    results = []
    for spec in cfg.train.saes:
        folder = cfg.layout.sae(spec.sae_id)
        say(f"evaluating {folder.name} on {len(held_out):,} held-out sequences "
            f"(CE loss on {min(cfg.eval.sequences, len(held_out))})")
        res = evaluate_sae(model, load_sae(folder), held_out, cfg.eval.sequences, cfg.eval.batch_size,
                           cfg.layout.eval_file(spec.sae_id))
        say(f"{folder.name}: L0 {res['l0']:.1f} | FVU {res['fvu']:.3f} | CE loss recovered "
            f"{res['ce_loss_recovered']:.3f} | KL {res['kl_div']:.3f} | dead {res['dead_fraction']:.1%} "
            f"| dense {res['dense_fraction']:.1%}")
        results.append(res)
    return results


def _read_eval(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_analyze(cfg: RunConfig, model: HookedTransformer, overwrite: bool = False,
                  sae_folders: list[Path] | None = None) -> list[Path]:
    """Analyse every SAE's features and its layer's neurons into its feature store (skipped when current)."""
    from features.analyze import run_analysis, select_tokens
    from features.run_config import config_to_dict
    from features.store import FeatureStore, density_note

    splits = prepare_tokens(cfg, model)
    n_tokens = select_tokens(splits, cfg.analyze)[0].numel()
    paths = []
    for folder in sae_folders or sae_dirs(cfg):
        say(f"analysing {folder.name}: features and {'neurons' if cfg.analyze.neurons else 'no neurons'} over "
            f"{n_tokens:,} tokens ({cfg.analyze.split})")
        t0 = time.perf_counter()
        meta = {"eval": _read_eval(cfg.layout.eval_file(folder.name)), "run_config": config_to_dict(cfg)}
        path, built = run_analysis(model, folder, store_in(folder), splits, cfg.analyze,
                                   cache_dir=cfg.layout.cache_dir, meta=meta, overwrite=overwrite)
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
    its feature store, and write its report. Needs `stage_analyze` first."""
    from features.labeling import run_label
    from features.report import headline, write_report

    if sae_folders is None:
        sae_folders = [cfg.layout.sae(cfg.label.sae)] if cfg.label.sae else sae_dirs(cfg)
    reports = []
    for folder in sae_folders:
        say(f"labeling {folder.name} with entity attributes ({cfg.label.entities} entity sets)")
        t0 = time.perf_counter()
        outcome = run_label(model, folder, store_in(folder), cfg.label, log=say)
        report = write_report(cfg.layout.report(folder.name), outcome)
        h = headline(outcome.result, outcome.semantics)
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


def stage_lookup(cfg: RunConfig, model: HookedTransformer) -> Path:
    """Where the lookup happens: per attribute, probe accuracy by layer and each MLP's share of its direction."""
    from features.labeling import load_entities
    from features.labeling.lookup import lookup_by_layer, write_lookup

    t0 = time.perf_counter()
    result = lookup_by_layer(model, load_entities(cfg.label), cfg.lookup, log=say)
    report = write_lookup(cfg.layout.run_report, result)
    say(f"lookup by layer in {time.perf_counter() - t0:.0f}s -> {report}")
    return report


def _labeled_monosemantic(cfg: RunConfig) -> dict[str, Any] | None:
    """kind -> (monosemantic share, CI) from the labeled SAE's report (`label.sae`), so the run's headline shows
    the like-for-like monosemanticity beside the directions; None when that SAE has not been labeled."""
    if not cfg.label.sae:
        return None
    path = cfg.layout.report(cfg.label.sae) / "label.json"
    if not path.is_file():
        return None
    heads = json.loads(path.read_text()).get("headline", {})
    return {kind: (h["monosemantic_share"], h.get("monosemantic_share_ci") or [None, None])
            for kind, h in heads.items() if kind in ("feature", "neuron") and h.get("monosemantic_share") is not None}


def stage_directions(cfg: RunConfig, model: HookedTransformer) -> Path | None:
    """Attribute directions across the run's MLP-output SAEs (one per layer), tested by interchange; run-level
    report in reports/run/. Skipped, with a line saying so, when the run has no `blocks.L.hook_mlp_out` SAE."""
    from features.labeling.directions_run import run_directions
    from features.run_report import write_run_report

    specs = [s for s in cfg.train.saes if (s.target_hook or s.hook).endswith(".hook_mlp_out")]
    if not specs:
        say("directions: skipped (no SAE or transcoder writing a blocks.L.hook_mlp_out hook in train.saes)")
        return None
    t0 = time.perf_counter()
    folders = [cfg.layout.sae(s.sae_id) for s in specs]
    result = run_directions(model, folders, cfg.directions, cfg.label, log=say)
    files = write_run_report(cfg.layout.run_report, result, monosemantic=_labeled_monosemantic(cfg))
    say(f"directions across {len(folders)} layer(s) in {time.perf_counter() - t0:.0f}s -> {files['markdown']}")
    return files["json"]
