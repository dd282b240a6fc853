"""Labeling speed: seconds for the whole labeling of the default entity sets, and the share spent in model forward
passes (the knowledge filter's full forwards, the context prompts run to the SAE's layer, and the causal checks'
patched forwards from that layer). Everything else -- SAE encoding, scores, tags, probes -- should be small.

    .venv/bin/python scripts/bench_label.py --sae runs/smollm2_mlp/saes/<sae-id> [--threads 1] [--json out.json]

Monosemanticity scoring (reads the feature store, no forward pass) is timed separately when the SAE folder has a
store. On a shared CPU, `--threads 1` is often much faster than two threads that fight other processes for cores;
the load average at the start and end is printed so a reader can judge the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from features.labeling import label, load_entities
from features.layout import store_in
from features.run_config import load_config
from features.store import KINDS
from sae.formats import load_sae
from sae.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_mlp.yaml", help="run config whose `label` section to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--sae", required=True, type=Path, help="SAE directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    model = load_model(cfg.model.name, "auto")
    sae = load_sae(args.sae)
    t_load = time.perf_counter() - t0
    entity_sets = load_entities(cfg.label)
    result = label(model, sae, entity_sets, cfg.label, log=lambda m: print(m, flush=True))
    t = result.timings
    figures = {"threads": torch.get_num_threads(), "load_average_start": load0, "model_and_sae_load_s": t_load,
               "label_s": t["total"], "forward_s": t.get("forward", 0.0),
               "forward_share": t.get("forward", 0.0) / t["total"], "phases_s": t,
               "entity_types": [es.entity_type for es in entity_sets],
               "tags": {k: sum(tag.kind == k for tag in result.tags) for k in KINDS},
               "causal_checked": len(result.causal)}
    store = store_in(args.sae)
    if store.is_file():
        from features.labeling.semantics import score_store
        from features.store import FeatureStore

        t1 = time.perf_counter()
        with FeatureStore.open(store) as fs:
            score_store(fs, entity_sets, lambda s: model.tokenizer(s, add_special_tokens=False)["input_ids"],
                        log=lambda m: None)
        figures["semantics_s"] = time.perf_counter() - t1
    figures["load_average_end"] = os.getloadavg()
    print(f"labeling: {t['total']:.1f}s, of which model forward {t.get('forward', 0):.1f}s "
          f"({100 * figures['forward_share']:.0f}%); " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()
                                                                  if k not in ("total", "forward")))
    if "semantics_s" in figures:
        print(f"monosemanticity scoring from the store: {figures['semantics_s']:.1f}s")
    print(f"threads {figures['threads']}, load average {load0[0]:.1f} -> {figures['load_average_end'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
