"""The spread of the labeler's headline over SAE training seeds: mean ± sd of each figure across runs that differ
only in `train.seed`, so a reader can tell a difference between features and neurons from the luck of one SAE.

Runs `saekit run` once per seed into `<name>_seed<S>` (the config's own seed is its own run, `runs/<name>`, so a
finished `make run` counts; seeds whose report exists are skipped), then reads each run's per-SAE
`label.json` headline and prints, per kind, the mean ± sd over seeds with each seed's value beside it.

    python scripts/seed_spread.py --config configs/smollm2_mlp.yaml --seeds 0 1 2 --json runs/seeds.json
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


def run_seed(config: str, name: str, seed: int, extra: list[str]) -> Path:
    """The seed's run folder, running the default pipeline into it first unless its label report exists."""
    cfg = load_config(config, overrides=[f"name={name}", f"train.seed={seed}", *extra])
    reports = cfg.layout.report(cfg.label.sae or cfg.train.saes[0].sae_id)
    if not (reports / "label.json").is_file():
        cmd = [sys.executable, "-m", "features.cli", "run", "--config", config, "--set", f"name={name}",
               "--set", f"train.seed={seed}"] + [x for o in extra for x in ("--set", o)]
        print("[seed_spread] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return reports / "label.json"


def spread(headlines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind and figure: the per-seed values, their mean and (with two or more seeds) their sample sd."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("feature", "neuron"):
        rows = [h[kind] for h in headlines if kind in h]
        if not rows:
            continue
        out[kind] = {}
        for key in FIGURES:
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
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    cfg = load_config(args.config, overrides=args.set)
    names = {s: cfg.name if s == cfg.train.seed else f"{cfg.name}_seed{s}" for s in args.seeds}  # reuse `make run`
    files = [run_seed(args.config, names[s], s, args.set) for s in args.seeds]
    result = {"config": args.config, "seeds": args.seeds,
              "figures": spread([json.loads(f.read_text())["headline"] for f in files])}
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
