"""What the viewer was pointed at (--run / --store / --sae / --model, or the SAEKIT_VIEW_* environment) turned into
paths through `RunLayout`, and the cached loaders every page reads through (store, SAE, live model, unit tables).

A missing or unbuilt input is not an error here: `Sources.problem` says what is missing and the command that
builds it, and the app shows that instead of a page.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from features.layout import SAE_CFG_FILE, RunLayout, store_in
from features.store import FeatureStore
from features.viewer.live import LiveModel, load_live
from sae.errors import SaekitError

LABEL_HINT = "run `saekit label --config {config}` to fill it"


@dataclass(frozen=True)
class Sources:
    """What the viewer was pointed at. `problem` says why there is no store to browse and how to build it."""

    store: Path | None
    sae_dir: Path | None
    model: str | None
    device: str
    run: Path | None
    sae_ids: tuple[str, ...]  # the run's SAEs, when it has several to choose from
    problem: str | None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The viewer's options; each falls back to its SAEKIT_VIEW_* variable (how tests pass them)."""
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="app_streamlit.py", description="saekit feature browser")
    ap.add_argument("--run", default=env("SAEKIT_VIEW_RUN"), help="a run directory (runs/<name>)")
    ap.add_argument("--store", default=env("SAEKIT_VIEW_STORE"), help="a features.db (or the folder holding it)")
    ap.add_argument("--sae", default=env("SAEKIT_VIEW_SAE"), help="SAE directory, or an SAE id of --run")
    ap.add_argument("--model", default=env("SAEKIT_VIEW_MODEL"), help="model for live text (default: the run's)")
    ap.add_argument("--device", default=env("SAEKIT_VIEW_DEVICE", "cpu"))
    args, _ = ap.parse_known_args(list(argv))
    return args


def config_of(run: Path | None) -> str:
    """The run's config as the commands in hints should spell it."""
    return str(RunLayout(run).config) if run is not None else "<your config>"


def label_hint(src: Sources) -> str:
    return LABEL_HINT.format(config=config_of(src.run))


def _analyze_hint(run: Path | None, sae: Path | None) -> str:
    config = config_of(run) if run is not None and RunLayout(run).config.is_file() else "<your config>"
    if sae is not None and run is None:
        return f"saekit analyze --config {config} --sae {sae}"
    return f"saekit analyze --config {config}" + (f" --sae {sae.name}" if sae is not None else "")


def _from_store(src: Sources, store: Path) -> Sources:
    """--store: a features.db, or an SAE folder holding one (then that folder is the SAE too)."""
    store = store_in(store) if store.is_dir() else store
    sae_dir = src.sae_dir
    if sae_dir is None and (store.parent / SAE_CFG_FILE).is_file():
        sae_dir = store.parent
    src = replace(src, store=store, sae_dir=sae_dir)
    if not store.is_file():
        return replace(src, problem=f"There is no feature store at `{store}`. Build it with "
                                    f"`{_analyze_hint(src.run, sae_dir)}`.")
    return src


def _from_run(src: Sources, run: Path, sae_arg: str | None, chosen_sae: str | None) -> Sources:
    """--run: pick its SAE (--sae as an id, the one chosen in the sidebar, else the first with a store)."""
    if not run.is_dir():
        return replace(src, problem=f"The run directory `{run}` does not exist. Train one with `saekit run "
                                    "--config <config>` (its outputs go to runs/<name>/).")
    layout = RunLayout(run)
    saes = layout.trained_saes()
    src = replace(src, sae_ids=tuple(p.name for p in saes))
    if sae_arg and src.sae_dir is None:
        if not layout.sae(sae_arg).is_dir():
            return replace(src, problem=f"Run `{run}` has no SAE `{sae_arg}` (its SAEs: "
                                        f"{', '.join(src.sae_ids) or 'none'}).")
        return replace(src, sae_dir=layout.sae(sae_arg))
    if src.sae_dir is None:
        if not saes:
            return replace(src, problem=f"Run `{run}` has no trained SAE yet (no `{layout.saes_dir}/<id>/"
                                        f"{SAE_CFG_FILE}`). Train one with `saekit run --config {layout.config}`.")
        with_store = [p for p in saes if store_in(p).is_file()]
        pick = [p for p in saes if p.name == chosen_sae] or with_store or saes
        return replace(src, sae_dir=pick[0])
    return src


def resolve_sources(args: argparse.Namespace, chosen_sae: str | None = None) -> Sources:
    """Turn --run / --store / --sae into paths, or say precisely what is missing."""
    run = Path(args.run) if args.run else None
    sae_dir = Path(args.sae) if args.sae and Path(args.sae).is_dir() else None
    src = Sources(None, sae_dir, args.model, args.device, run, (), None)
    if args.store:
        return _from_store(src, Path(args.store))
    if run is not None:
        src = _from_run(src, run, args.sae, chosen_sae)
        if src.problem is not None:
            return src
    if src.sae_dir is not None:
        store = store_in(src.sae_dir)
        src = replace(src, store=store)
        if not store.is_file():
            return replace(src, problem=f"SAE `{src.sae_dir}` has no feature store yet (`{store}` is missing). "
                                        f"Build it with `{_analyze_hint(run, src.sae_dir)}`.")
        return src
    if args.sae:
        return replace(src, problem=f"`{args.sae}` is not an SAE directory. Point `--sae` to a folder with "
                                    "cfg.json and sae_weights.safetensors, or use `--run runs/<name>`.")
    return replace(src, problem="No feature store was given. Start the viewer with `saekit view --run runs/<name>` "
                                "(or `streamlit run app_streamlit.py -- --store <features.db> --sae <SAE dir>`); a "
                                "run's store is built by `saekit analyze --config <config>`.")


def model_name(src: Sources, store: FeatureStore) -> str | None:
    """The model for live text: --model, else the run's model setting, else the SAE's metadata."""
    if src.model:
        return src.model
    run_cfg = store.meta.get("run_config") or {}
    name = (run_cfg.get("model") or {}).get("name")
    sae_meta = (store.meta.get("sae") or {}).get("metadata") or {}
    return name or sae_meta.get("model_name") or store.meta.get("model_name")


# ---------------------------------------------------------------------------------------------
# Cached loaders (one per server process, shared by sessions)


def store_stamp(path: Path) -> tuple[int, int, int]:
    """Changes when the store is rebuilt (new inode) or written (the WAL grows), so caches refresh."""
    st_ = path.stat()
    wal = path.with_name(path.name + "-wal")
    return st_.st_ino, st_.st_mtime_ns, wal.stat().st_mtime_ns if wal.exists() else 0


@st.cache_resource(show_spinner=False, max_entries=4)
def open_store(path: str, stamp: tuple[int, int, int]) -> FeatureStore:
    return FeatureStore.open(path)


@st.cache_resource(show_spinner="Loading the model and the SAE for live text…", max_entries=2)
def open_live(sae_dir: str | None, model: str | None, device: str) -> tuple[LiveModel | None, str | None]:
    """(live model, None), or (None, why live text is off); cached either way so a failure is not retried."""
    try:
        return load_live(sae_dir, model, device), None
    except SaekitError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken SAE or model must not take the browsing pages down
        return None, f"{type(exc).__name__}: {exc}"


@st.cache_resource(show_spinner=False, max_entries=2)
def open_sae(sae_dir: str) -> Any:
    from sae.formats import load_sae

    return load_sae(sae_dir)


@st.cache_data(show_spinner=False, max_entries=8)
def unit_frame(path: str, stamp: tuple[int, int, int], kind: str) -> pd.DataFrame:
    """All units of a kind as a table (plots, exports); refreshed when the store changes."""
    store = open_store(path, stamp)
    if not store.n_units(kind):
        return pd.DataFrame()
    df = pd.DataFrame(store.unit_table(kind))
    df.insert(0, "kind", kind)
    df["top_tokens"] = df["top_tokens"].map(lambda s: ", ".join(t.strip() for t in s.split(" | ")[:8]))
    return df
