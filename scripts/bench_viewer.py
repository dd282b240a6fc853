"""How fast is the feature browser on a big store? Server-side page builds and a real browser's render time.

    python scripts/bench_viewer.py                       # trains and analyses a 16k-feature SAE once, then measures
    python scripts/bench_viewer.py --store runs/x/saes/<id>/features.db --json out.json

Without --store the script measures a real store: a TopK SAE with 28 x 576 = 16,128 features trained briefly
(500k tokens) on the benchmark run's cache of SmolLM2's blocks.6.hook_mlp_out, analysed by the default
analysis (`analyze` section defaults: 256 held-out-first sequences, features and the layer's 1,536 neurons),
exactly as these commands would build it (the cache first, as for scripts/bench_train.py):

    saekit cache   --set name=bench --set corpus.max_sequences=2000
    saekit train   --set name=bench --set corpus.max_sequences=2000 --set model.device=cpu \
                   --set 'train.saes=[{hook: blocks.6.hook_mlp_out, architecture: topk, expansion: 28, k: 32, \
                   lr: 0.003}]' --set train.total_tokens=500000
    saekit analyze (the same --set options)

Both stages are skipped when their outputs are already there. The labeler's tables are then filled with
synthetic rows through the store API (marked `source: bench` in `probes`), so the overview's plots and the
tag filters have data to show without the labeling stage's minutes.

Server-side figures are `AppTest` runs of the viewer's APP_FILE (the script `saekit view` serves): the page's
whole script, every store query included, median over several units. `<page>_cold` is the first run of each
page in a fresh session (it opens the store and fills the caches); the plain name is the warm median after
it. The browser figure is headless Chromium (Playwright) navigating to a feature page's URL until the page
marks itself rendered (warm: the server has served a page before). Targets: a feature page under 0.1 s
server-side, warm, and under 1 s in the browser.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from features.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from features.viewer import APP_FILE  # noqa: E402 - after the path fix, for a run from a bare checkout

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


BENCH_OVERRIDES = ["name=bench", "corpus.max_sequences=2000", "model.device=cpu", "train.total_tokens=500000",
                   "train.saes=[{hook: blocks.6.hook_mlp_out, architecture: topk, expansion: 28, k: 32, lr: 0.003}]"]


def build_store(runs_dir: Path) -> Path:
    """The store of a real trained 16k-feature SAE, built by the pipeline's own train and analyze stages."""
    from features import pipeline
    from features.layout import store_in
    from features.run_config import load_config
    from features.store import FeatureStore

    cfg = load_config(REPO / "configs" / "smollm2_mlp.yaml", [*BENCH_OVERRIDES, f"runs_dir={runs_dir}"])
    hook = cfg.train.saes[0].hook
    if not (cfg.layout.cache_dir / hook / "manifest.json").is_file():
        raise SystemExit(f"no activation cache at {cfg.layout.cache_dir / hook}; build it first with "
                         "`saekit cache --set name=bench --set corpus.max_sequences=2000`")
    pipeline.start_run(cfg)
    resume = cfg.layout.checkpoint.is_file()
    (sae_dir,) = pipeline.stage_train(cfg, resume=resume)
    pipeline.stage_analyze(cfg, pipeline.run_model(cfg))
    path = store_in(sae_dir)
    with FeatureStore.open(path, writable=True) as store:
        if not store.probes():
            fake_labels(store, store.n_units("feature"))
    return path


def fake_labels(store: FeatureStore, n_features: int) -> None:
    """Synthetic tags, semantics and probes (marked `source: bench`) so the plots and tag filters have data."""
    import numpy as np

    from features.store import Probe, Semantics, Tag

    rng = np.random.default_rng(0)
    values = [("country", "continent", v) for v in ("Europe", "Asia", "Africa", "Americas", "Oceania")]
    values += [("element", "block", v) for v in "spdf"]
    tags = [Tag("feature", int(i), *values[int(rng.integers(len(values)))], precision=float(rng.random()),
                recall=float(rng.random()), f1=float(rng.random()), auroc=float(0.5 + rng.random() / 2),
                support=20, entities=["France", "Japan", "Kenya"], causal_effect=float(rng.normal()),
                causal_status="ok")
            for i in rng.choice(n_features, min(600, n_features), replace=False)]
    store.write_tags(tags)
    sem = [Semantics(kind, i, float(rng.beta(2, 2)), "monosemantic" if rng.random() < 0.4 else "polysemantic",
                     [{"concept": "country.continent=Europe", "share": 0.6}])
           for kind in ("feature", "neuron") for i in range(store.n_units(kind))]
    store.write_semantics(sem, replace=True)
    store.write_probes([Probe(kind, et, at, "logistic", float(rng.random()), 0.2, 200, 50, {"source": "bench"})
                        for kind in ("feature", "neuron") for et, at, _ in dict.fromkeys((v[0], v[1], "")
                                                                                        for v in values)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_side(store: Path, ids: list[int], runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per page: the page script's own time (from its end marker: every store query, every
    element built and queued) and the whole AppTest run around it. One session, warm caches: the first run of
    each page, which opens the store and fills the caches, is reported apart as `<page>_cold`."""
    import re

    from streamlit.testing.v1 import AppTest

    os.environ["SAEKIT_VIEW_STORE"] = str(store)
    os.environ.pop("SAEKIT_VIEW_RUN", None)
    at = AppTest.from_file(str(APP_FILE), default_timeout=300)

    def timed(params: dict[str, str]) -> tuple[float, float]:
        at.query_params = dict(params)
        t0 = time.perf_counter()
        at.run()
        wall = time.perf_counter() - t0
        if at.exception:
            raise RuntimeError(f"{params}: {at.exception[0].message}")
        marker = next(h.value for h in at.html if "sk-done" in h.value)
        return float(re.search(r'data-seconds="([0-9.]+)"', marker).group(1)), wall

    queries = ["the", "a", "of", "ing", "s", "and", "to", "in"]
    pages = {"overview": [{"page": "overview"}] * (runs + 1),
             "feature_page": [{"page": "feature", "id": str(i)} for i in ids[:runs + 1]],
             "filtered_list": [{"page": "list", "q": q, "cls": "polysemantic", "fmin": "0.0001", "sort": "max_act"}
                               for q in queries[:runs + 1]]}
    script, wall = {}, {}
    for name, param_list in pages.items():
        script[f"{name}_cold"], wall[f"{name}_cold"] = timed(param_list[0])
        measured = [timed(p) for p in param_list[1:]]
        script[name] = statistics.median(m[0] for m in measured)
        wall[name] = statistics.median(m[1] for m in measured)
    return script, wall


def browser_side(store: Path, ids: list[int], runs: int, shots: Path | None) -> float:
    """Median seconds from navigating to a feature page's URL until it marks itself rendered, in Chromium."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "SAEKIT_VIEW_STORE": str(store)}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
                               "--client.toolbarMode", "viewer"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for _ in range(600):  # the server takes a moment to start
                try:
                    page.goto(f"{base}/?page=feature&id={ids[0]}")
                    break
                except Exception:  # noqa: BLE001 - connection refused until it listens
                    time.sleep(0.2)
            page.wait_for_selector(f".sk-done[data-page='feature-{ids[0]}']", state="attached", timeout=120_000)
            times = []
            for i in ids[1:runs + 1]:
                t0 = time.perf_counter()
                page.goto(f"{base}/?page=feature&id={i}")
                page.wait_for_selector(f".sk-done[data-page='feature-{i}']", state="attached", timeout=120_000)
                times.append(time.perf_counter() - t0)
            if shots is not None:
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / "bench_feature_page.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="an existing store (features.db or its SAE folder) to measure")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "runs",
                    help="runs folder holding the benchmark run 'bench' (its cache; the SAE and store are added)")
    ap.add_argument("--runs", type=int, default=7, help="measured runs per page")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--json", type=Path, help="write {'seconds': {...}} here")
    args = ap.parse_args()

    from features.layout import store_in
    from features.store import FeatureStore, UnitQuery

    store = args.store or build_store(args.runs_dir)
    store = store_in(store) if store.is_dir() else store
    with FeatureStore.open(store) as s:
        n = s.n_units("feature")
        live = [u.index for u in s.search(UnitQuery(status="live"), limit=n)]
    print(f"store {store}: {n:,} features")
    ids = random.Random(0).sample(live, min(len(live), args.runs + 1))
    seconds, apptest = server_side(store, ids, args.runs)
    if not args.no_browser:
        seconds["browser_feature_page"] = browser_side(store, ids, args.runs, REPO / "test-output" / "viewer")
    print(f"{'':24s} {'script':>9s} {'AppTest run':>12s}   (_cold: a page's first run in a fresh session)")
    for name, value in seconds.items():
        target = {"feature_page": 0.1, "browser_feature_page": 1.0}.get(name)
        print(f"{name:24s} {value * 1000:7.1f} ms {apptest[name] * 1000 if name in apptest else float('nan'):9.1f} ms"
              + (f"   (target {target * 1000:.0f} ms)" if target else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds": seconds, "apptest_seconds": apptest, "n_features": n,
                                         "store": str(store)}, indent=2))


if __name__ == "__main__":
    main()
