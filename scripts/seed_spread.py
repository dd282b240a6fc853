"""The spread of the labeler's headline over SAE training seeds: mean ± sd of each figure across runs that differ
only in `train.seed`, so a reader can tell a difference between features and neurons from the luck of one SAE.

Runs `saekit run` once per seed into `<name>_seed<S>` (the config's own seed is its own run, `runs/<name>`, so a
finished `make run` counts; seeds whose report exists are skipped), then reads each run's per-SAE
`label.json` headline and prints, per kind, the mean ± sd over seeds with each seed's value beside it.
With `--directions` each seed runs `saekit cache` (for cached training), `train` and `directions` instead, and the
figures are the run-level directions headline (`reports/run/label.json`): cause / upper bound, disentanglement and
holding directions per kind, and features minus neurons.

    python scripts/seed_spread.py --config configs/smollm2_mlp.yaml --seeds 0 1 2 --json runs/seeds.json
    python scripts/seed_spread.py --config configs/smollm2_directions.yaml --directions --json runs/dir_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from features.run_config import load_config
from sae.io import atomic_write_text

FIGURES = ("monosemantic_share", "tags", "attributes_tagged", "attributes_causal", "probe_1", "probe_k")
DIRECTION_FIGURES = ("cause_fraction", "disentanglement", "attributes_causal")
DIRECTION_KINDS = ("feature", "neuron", "baseline", "features_minus_neurons")


def saekit(command: str, config: str, name: str, seed: int, extra: list[str]) -> None:
    """`saekit COMMAND` for one seed's run, printed first so a long sweep shows where it is."""
    cmd = [sys.executable, "-m", "features.cli", command, "--config", config, "--set", f"name={name}",
           "--set", f"train.seed={seed}"] + [x for o in extra for x in ("--set", o)]
    print("[seed_spread] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_seed(config: str, name: str, seed: int, extra: list[str]) -> Path:
    """The seed's run folder, running the default pipeline into it first unless its label report exists."""
    cfg = load_config(config, overrides=[f"name={name}", f"train.seed={seed}", *extra])
    reports = cfg.layout.report(cfg.label.sae or cfg.train.saes[0].sae_id)
    if not (reports / "label.json").is_file():
        saekit("run", config, name, seed, extra)
    return reports / "label.json"


def run_seed_directions(config: str, name: str, seed: int, extra: list[str]) -> Path:
    """The seed's run-level directions report, training the seed's SAEs and testing their directions first
    unless it exists; a cached config caches first (resumed, or skipped when complete)."""
    cfg = load_config(config, overrides=[f"name={name}", f"train.seed={seed}", *extra])
    report = cfg.layout.run_report / "label.json"
    if not report.is_file():
        for command in (["cache"] if cfg.train.source == "cache" else []) + ["train", "directions"]:
            saekit(command, config, name, seed, extra)
    return report


def directions_headline(report: dict[str, Any]) -> dict[str, Any]:
    """The directions report's headline per kind, with features minus neurons as one more row."""
    return {**report["headline"],
            "features_minus_neurons": {"cause_fraction": report["features_minus_neurons"]["cause_fraction_diff"]}}


def spread(headlines: list[dict[str, Any]], kinds: tuple[str, ...] = ("feature", "neuron"),
           figures: tuple[str, ...] = FIGURES) -> dict[str, dict[str, Any]]:
    """Per kind and figure: the per-seed values, their mean and (with two or more seeds) their sample sd."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        rows = [h[kind] for h in headlines if kind in h]
        if not rows:
            continue
        out[kind] = {}
        for key in figures:
            vals = [float(r[key]) for r in rows if r.get(key) is not None]
            out[kind][key] = {"values": vals, "mean": statistics.fmean(vals) if vals else None,
                              "sd": statistics.stdev(vals) if len(vals) > 1 else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_mlp.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (as `saekit run --set`)")
    parser.add_argument("--directions", action="store_true",
                        help="the run-level directions headline (saekit directions) instead of the labeler's")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    cfg = load_config(args.config, overrides=args.set)
    names = {s: cfg.name if s == cfg.train.seed else f"{cfg.name}_seed{s}" for s in args.seeds}  # reuse `make run`
    if args.directions:
        files = [run_seed_directions(args.config, names[s], s, args.set) for s in args.seeds]
        heads = [directions_headline(json.loads(f.read_text())) for f in files]
        figures = spread(heads, DIRECTION_KINDS, DIRECTION_FIGURES)
    else:
        files = [run_seed(args.config, names[s], s, args.set) for s in args.seeds]
        figures = spread([json.loads(f.read_text())["headline"] for f in files])
    result = {"config": args.config, "seeds": args.seeds, "directions": args.directions, "figures": figures}
    for kind, figs in result["figures"].items():
        for key, f in figs.items():
            if f["mean"] is not None:
                sd = "" if f["sd"] is None else f" ± {f['sd']:.3f}"
                each = ", ".join(f"{v:.3f}" for v in f["values"])
                print(f"{kind:8s} {key:20s} {f['mean']:.3f}{sd}   per seed: {each}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
