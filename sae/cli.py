"""`saekit` command line: one subcommand per pipeline stage, plus `run` for all of them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from sae.config import RunConfig, load_config
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
    from sae import pipeline

    pipeline.start_run(cfg)
    pipeline.stage_cache(cfg, pipeline.run_model(cfg), overwrite=args.overwrite)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from sae import pipeline

    pipeline.start_run(cfg)
    pipeline.stage_train(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from sae import pipeline

    pipeline.stage_eval(cfg, pipeline.run_model(cfg))


def cmd_run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from sae import pipeline
    from sae.train import CHECKPOINT_FILE

    pipeline.start_run(cfg)
    model = pipeline.run_model(cfg)
    pipeline.stage_cache(cfg, model, overwrite=args.overwrite)
    resume = (cfg.run_dir / "checkpoints" / CHECKPOINT_FILE).is_file() and not args.overwrite
    pipeline.stage_train(cfg, resume=resume, overwrite=args.overwrite)
    pipeline.stage_eval(cfg, model)
    pipeline.say(f"done: outputs are in {cfg.run_dir}/")


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
        ("cache", "run the model once and cache the configured hooks' activations to sharded files", cmd_cache),
        ("train", "train the configured SAEs on the cached activations (torchrun for several processes)",
         cmd_train),
        ("eval", "evaluate trained SAEs on held-out text: L0, FVU, dead/dense, CE loss recovered, KL", cmd_eval),
        ("run", "run every stage of the pipeline for a config, resuming what is already done", cmd_run),
    ]
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--overwrite", action="store_true",
                       help="rebuild outputs that were built from other inputs instead of refusing")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.set_defaults(fn=fn)
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
