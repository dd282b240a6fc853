"""`saekit` command line: one subcommand per pipeline stage, plus `run` for all of them.

The top of the stack: it parses arguments, loads the RunConfig and calls `features.pipeline`.
Under torchrun: `torchrun --nproc_per_node N --no-python saekit train --config C` (or `-m features.cli`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from features.layout import store_in
from features.run_config import RunConfig, load_config
from sae.errors import SaekitError

DEFAULT_CONFIG = "configs/smollm2_mlp.yaml"

EPILOG = """examples:
  saekit run --config configs/smollm2_mlp.yaml          # every stage, end to end
  saekit cache --config configs/smollm2_mlp.yaml --set corpus.max_sequences=20000
  saekit cache --config my.yaml --set 'cache.hooks=[blocks.{2..8}.mlp.hook_post]'

Outputs go to <runs_dir>/<name>/ (see README.md, "Run directory"). Any interrupted stage
resumes when the same command is run again."""


def _config(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.set)


def cmd_cache(args: argparse.Namespace) -> None:
    cfg = _config(args)  # validate before the slow imports, so a typo is reported at once
    from features import pipeline
    from sae.distributed import dist_info, leave

    pipeline.start_run(cfg)
    pipeline.stage_cache(cfg, pipeline.run_model(cfg), overwrite=args.overwrite)
    leave(dist_info()[1])  # under torchrun: every rank has seen the merged manifest; gloo aborts an open group


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline

    pipeline.start_run(cfg)
    pipeline.stage_train(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_plan(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline
    from features.plan import plan

    plan(cfg, pipeline.run_model(cfg), args.processes, pipeline.say)


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline

    pipeline.stage_eval(cfg, pipeline.run_model(cfg))


def cmd_run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline

    pipeline.start_run(cfg)
    model = pipeline.run_model(cfg)
    if cfg.train.source == "cache":
        pipeline.stage_cache(cfg, model, overwrite=args.overwrite)
    else:
        pipeline.say("cache: skipped (train.source: model trains on the fly from the forward pass)")
    resume = cfg.layout.checkpoint.is_file() and not args.overwrite
    pipeline.stage_train(cfg, resume=resume, overwrite=args.overwrite, model=model)
    pipeline.stage_eval(cfg, model)
    pipeline.stage_analyze(cfg, model, overwrite=args.overwrite)
    pipeline.stage_label(cfg, model)
    pipeline.say(f"done: outputs are in {cfg.run_dir}/")
    pipeline.say(f"browse the features: saekit view --run {cfg.run_dir}")


def _sae_folders(cfg: RunConfig, args: argparse.Namespace) -> list[Path]:
    """--sae: an SAE id of the run or any SAE directory; default: every SAE the config trains."""
    from features.pipeline import sae_dirs

    if not args.sae:
        return sae_dirs(cfg)
    folder = Path(args.sae)
    if not folder.is_dir():
        folder = cfg.layout.sae(args.sae)
    if not folder.is_dir():
        ids = ", ".join(d.name for d in sae_dirs(cfg))
        raise SaekitError(f"--sae {args.sae}: neither a directory nor an SAE of run '{cfg.name}' (its SAEs: {ids})")
    return [folder]


def cmd_analyze(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline

    folders = _sae_folders(cfg, args)
    pipeline.stage_analyze(cfg, pipeline.run_model(cfg), overwrite=args.overwrite, sae_folders=folders)


def cmd_label(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline
    from features.labeling import load_entities

    folders = _sae_folders(cfg, args) if args.sae else None
    load_entities(cfg.label)  # a mistake in the entity files is reported before the model loads
    pipeline.stage_label(cfg, pipeline.run_model(cfg), sae_folders=folders)


def cmd_lookup(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline
    from features.labeling import load_entities

    load_entities(cfg.label)  # a mistake in the entity files is reported before the model loads
    pipeline.stage_lookup(cfg, pipeline.run_model(cfg))


def cmd_directions(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import pipeline
    from features.labeling import load_entities

    load_entities(cfg.label)
    pipeline.stage_directions(cfg, pipeline.run_model(cfg))


def cmd_mix(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features.labeling import load_entities
    from features.labeling.entity_mix import write_mix

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SaekitError(f"{out} already exists; pass --overwrite to write it again, or choose another --out")
    stats = write_mix(out, args.corpus, load_entities(cfg.label), args.fraction, cfg.directions.train_fraction,
                      cfg.directions.seed, args.max_chars)
    print(f"[saekit] mix: {stats.corpus_documents:,} corpus documents and {stats.fact_documents:,} fact documents "
          f"({stats.fact_share:.1%} of {stats.corpus_chars + stats.fact_chars:,} characters) about "
          f"{stats.entities_written:,} training entities; {stats.entities_held_out:,} held-out entities are in no "
          f"fact -> {out}\n[saekit] to train on it, set corpus.source: {out} in a config")


def cmd_export(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from features import export

    folders = _sae_folders(cfg, args)
    for folder in folders:
        out = Path(args.out) if args.out else cfg.layout.export(folder.name, args.format)
        if args.out and len(folders) > 1:
            out = out / folder.name
        if args.format == "bundle":
            export.export_bundle(folder, store_in(folder), out, overwrite=args.overwrite)
            print(f"[saekit] bundle (SAE-Lens files + features.db + README.json) -> {out}")
        elif args.format == "parquet":
            files = export.export_parquet(store_in(folder), out)
            print(f"[saekit] {len(files)} Parquet tables -> {out}")
        else:
            files = export.export_neuronpedia(store_in(folder), out, kind=args.kind)
            print(f"[saekit] {len(files)} Neuronpedia batch files ({args.kind}s) -> {out}")


def cmd_view(args: argparse.Namespace) -> None:
    """Serve the packaged viewer (features/viewer/app.py) for a run (or a store / SAE directory) on localhost."""
    import subprocess

    from features.viewer import APP_FILE

    run = args.run
    if not (run or args.store or args.sae):
        run = str(_config(args).run_dir)
    viewer_args = [a for flag, value in (("--run", run), ("--store", args.store), ("--sae", args.sae),
                                         ("--model", args.model), ("--device", args.device)) if value
                   for a in (flag, str(value))]
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.headless", "true", "--server.port",
           str(args.port), "--server.address", args.host, "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer", "--", *viewer_args]
    print(f"[saekit] feature browser on http://{args.host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    code = subprocess.call(cmd)
    if code not in (0, -2, 130):
        raise SaekitError(f"streamlit exited with status {code}")


def _add_view_parser(sub: argparse._SubParsersAction) -> None:
    help_text = "browse a run's features in the Streamlit viewer (overview, lists, feature pages, live text)"
    p = sub.add_parser("view", help=help_text, description=help_text,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  saekit view --run runs/small\n"
                              "  saekit view --store runs/small/saes/<sae-id>/features.db --model smollm2-135m")
    _add_config_args(p)
    p.add_argument("--run", help="run directory (default: the run of --config)")
    p.add_argument("--store", help="a features.db, or the SAE folder holding it")
    p.add_argument("--sae", help="SAE directory, or an SAE id of --run (default: the run's SAE with a store)")
    p.add_argument("--model", help="model for live text and steering (default: the run's model)")
    p.add_argument("--device", default="cpu", help="device for live text (default: cpu)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.set_defaults(fn=cmd_view)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML run config (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set corpus.max_sequences=20000 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saekit", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Cache MLP activations, train sparse autoencoders, label and browse their features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable[[argparse.Namespace], None]]] = [
        ("cache", "run the model once and cache the configured hooks' activations to sharded files (torchrun: "
                  "each process writes its own shards)", cmd_cache),
        ("train", "train the configured SAEs on the cached activations, or on the fly with train.source: model "
                  "(torchrun for several processes)", cmd_train),
        ("plan", "before anything runs: cache size per hook, on-the-fly buffer memory, and expected times "
                 "from throughput measured on this machine (writes nothing)", cmd_plan),
        ("eval", "evaluate trained SAEs on held-out text: L0, FVU, dead/dense, CE loss recovered, KL", cmd_eval),
        ("run", "run every stage of the pipeline for a config, resuming what is already done", cmd_run),
        ("analyze", "analyse SAE features and their layer's MLP neurons into a feature store (features.db)",
         cmd_analyze),
        ("label", "label features and neurons with entity attributes: tags, probes, causal checks, "
                  "monosemanticity, report", cmd_label),
        ("lookup", "probe each entity attribute layer by layer (residual stream, MLP outputs) and each MLP layer's "
                   "share of its direction: reports/run/lookup.*", cmd_lookup),
        ("directions", "attribute directions across the run's MLP-output SAEs, tested by interchange against neurons "
                       "and a PCA basis: reports/run/label.*", cmd_directions),
        ("mix", "write a training corpus with more entity mentions: the corpus interleaved with fact sentences about "
                "the directions' training entities only (held-out entities are never written)", cmd_mix),
        ("export", "export a feature store: Parquet tables, Neuronpedia JSON batches, or a portable bundle",
         cmd_export),
    ]
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--overwrite", action="store_true",
                       help="rebuild outputs that were built from other inputs instead of refusing")
        if name in ("analyze", "export", "label"):
            p.add_argument("--sae", help="one SAE: its id under runs/<name>/saes/ or any SAE directory "
                                         "(default: every SAE in the config)")
        if name == "export":
            p.add_argument("--format", choices=("parquet", "neuronpedia", "bundle"), default="bundle",
                           help="parquet tables, Neuronpedia-style JSON batches, or a bundle (default)")
            p.add_argument("--out", help="output folder (default: runs/<name>/exports/<sae-id>-<format>)")
            p.add_argument("--kind", choices=("feature", "neuron"), default="feature",
                           help="neuronpedia: which units to export (default: feature)")
        if name == "mix":
            p.add_argument("--out", required=True, help="the .jsonl file to write")
            p.add_argument("--fraction", type=float, default=0.2,
                           help="share of the characters that are fact sentences (default: 0.2)")
            p.add_argument("--corpus", default="embedded",
                           help="the text to interleave the facts with, any corpus.source (default: embedded)")
            p.add_argument("--max-chars", type=int, default=None,
                           help="stop after this many characters in all (default: the whole corpus)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "plan":
            p.add_argument("--processes", type=int, default=1,
                           help="processes (GPUs) the run will use, over all nodes (default: 1)")
        p.set_defaults(fn=fn)
    _add_view_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SaekitError as exc:
        print(f"saekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saekit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
