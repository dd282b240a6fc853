"""The export page: the SAE-Lens bundle, the unit tables (CSV, Parquet) and Neuronpedia-style JSON as downloads.
Each archive is built in a temporary folder only when its button is clicked.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st

from features.layout import SAE_CFG_FILE
from features.store import FeatureStore
from features.viewer.nav import done
from features.viewer.sources import Sources, unit_frame


def render(store: FeatureStore, src: Sources, path: str, stamp: tuple[int, int, int]) -> None:
    from features import export  # pyarrow and the exporters load when this page is first opened

    st.title("Export")
    sae_id = store.meta.get("sae_id") or store.path.parent.name

    def zipped(build: Callable[[Path], Path]) -> Callable[[], bytes]:
        return lambda: zip_folder(build, sae_id)

    st.subheader("SAE-Lens bundle")
    st.markdown("The SAE directory (cfg.json, weights, sparsity, eval) with `features.db` and a README.json: "
                "`sae_lens.SAE.load_from_disk(folder)` and `sqlite3` read it as is.")
    sae_dir = src.sae_dir
    if sae_dir is not None and (sae_dir / SAE_CFG_FILE).is_file():
        st.download_button("Download bundle (.zip)",
                           zipped(lambda out: export.export_bundle(sae_dir, Path(path), out)),
                           file_name=f"{sae_id}-bundle.zip", mime="application/zip", key="ex_bundle")
    else:
        st.caption("No SAE directory beside this store (start with --sae or --run), so only the tables below.")
    st.subheader("Feature table")
    c = st.columns(4)
    for i, kind in enumerate(k for k in ("feature", "neuron") if store.n_units(k)):
        df = unit_frame(path, stamp, kind)
        c[2 * i].download_button(f"{kind}s (CSV)", lambda df=df: df.to_csv(index=False).encode(),
                                 file_name=f"{sae_id}-{kind}s.csv", mime="text/csv", key=f"ex_csv_{kind}")
        c[2 * i + 1].download_button(f"{kind}s (Parquet)", lambda df=df: parquet_bytes(df),
                                     file_name=f"{sae_id}-{kind}s.parquet", mime="application/octet-stream",
                                     key=f"ex_pq_{kind}")
    st.caption("One row per unit: index, status, firings, frequency, mean and max activation, top tokens, "
               "semantic class and score, number of tags and best tag F1. `saekit export --format parquet` writes "
               "every table (examples, logits, related units) instead.")
    st.subheader("Neuronpedia-style JSON")
    st.markdown("Per feature: top activations, interval examples (`bin_min`, `bin_max`, `bin_contains`), logits, "
                "frequency and logit histograms, correlated neurons, explanations; in batches of 128 features.")
    st.download_button("Download Neuronpedia JSON (.zip)",
                       zipped(lambda out: (export.export_neuronpedia(Path(path), out), out)[1]),
                       file_name=f"{sae_id}-neuronpedia.zip", mime="application/zip", key="ex_np")
    done("export")


def zip_folder(build: Callable[[Path], Path], prefix: str) -> bytes:
    """Zip what `build(folder)` writes (an export), under `prefix/`; built in a temporary folder on click."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "out")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    z.write(f, f"{prefix}/{f.relative_to(folder)}")
        return buf.getvalue()


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
