"""saekit's feature browser, the script `streamlit run` executes: `saekit view --run runs/<name>`, or
`streamlit run features/viewer/app.py -- --store <features.db> --sae <SAE dir> [--model <name or HF dir>]`
(`app_streamlit.py` at the repository root runs the same).

Presentation only: every number comes from the feature store (`features.store`), live text and steering from
`features.viewer.live`. Pages are chosen by query parameters (`?page=feature&id=123`, `?page=list&q=Paris`), so
every view has a URL that can be shared, bookmarked or opened in a new tab; links between units are plain links.
Options can also come from the environment (SAEKIT_VIEW_RUN, _STORE, _SAE, _MODEL, _DEVICE), which is how tests
pass them. Streamlit runs this file as `__main__` with its folder on sys.path, hence absolute imports only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from features.layout import STORE_FILE, RunLayout
from features.store import FeatureStore
from features.viewer import (
    compare,
    directions_page,
    export_page,
    listing,
    live_page,
    lookup_page,
    overview,
    steer_page,
    unit_page,
)
from features.viewer.markup import CSS
from features.viewer.nav import done, goto, navigation, qp, start_run
from features.viewer.sources import Sources, config_of, open_store, parse_args, resolve_sources, store_stamp
from sae.errors import SaekitError


def sidebar(store: FeatureStore | None, src: Sources) -> None:
    """What is being browsed, a form to open a unit by id, and the run's SAE picker."""
    sb = st.sidebar
    if store is not None:
        s = store.summary()
        sb.caption(f"**{s['sae_id'] or store.path.parent.name}**  \n{s['model_name']} · `{s['hook']}`")
        with sb.form("open_unit", border=False):
            st.markdown("**Open a unit by id**")
            c1, c2 = st.columns([3, 2])
            kinds = [k for k in ("feature", "neuron") if store.n_units(k)]
            kind = c1.selectbox("kind", kinds, label_visibility="collapsed", key="open_kind")
            idx = c2.number_input("id", min_value=0, step=1, value=0, label_visibility="collapsed", key="open_id")
            if st.form_submit_button("Open", width="stretch"):
                goto(kind, id=int(idx))
    if len(src.sae_ids) > 1:
        current = src.sae_dir.name if src.sae_dir is not None else src.sae_ids[0]
        pick = sb.selectbox("SAE of this run", src.sae_ids, index=src.sae_ids.index(current)
                            if current in src.sae_ids else 0)
        if pick != current:
            st.query_params["sae"] = pick
            st.rerun()
    if src.store is not None:
        sb.caption(f"store: `{src.store}`")


def page_missing(problem: str) -> None:
    """No store to browse: the reason, the commands that build one, and runs here that have one."""
    st.title("No feature store to browse")
    st.error(problem)
    st.markdown("The viewer reads a run's feature store (`runs/<name>/saes/<sae-id>/features.db`). The pipeline "
                "that builds one:")
    st.code("saekit run --config configs/smollm2_mlp.yaml            # cache, train, eval, analyze\n"
            "saekit analyze --config runs/<name>/config.yaml       # (re)build only the feature store\n"
            "saekit view --run runs/<name>                         # then browse it", language="bash")
    runs_dir = Path("runs")
    runs = [r for r in sorted(runs_dir.iterdir()) if any(RunLayout(r).saes_dir.glob(f"*/{STORE_FILE}"))] \
        if runs_dir.is_dir() else []
    if runs:
        st.markdown("Runs here that have a store: " + ", ".join(f"`saekit view --run {r}`" for r in runs))
    done("missing")


def show(page: str, store: FeatureStore, src: Sources, path: str, stamp: tuple[int, int, int]) -> None:
    """Render the page the menu (or the URL) chose; `path` and `stamp` key the cached unit tables."""
    if page == "overview":
        overview.render(store, src, path, stamp)
    elif page == "list":
        listing.render(store, src)
    elif page in ("feature", "neuron"):
        unit_page.render(store, src, page)
    elif page == "compare":
        compare.render(store)
    elif page == "live":
        live_page.render(store, src)
    elif page == "steer":
        steer_page.render(store, src)
    elif page == "export":
        export_page.render(store, src, path, stamp)


def main(argv: Sequence[str] = ()) -> None:
    """One script run: resolve what to browse, draw the menu and the sidebar, then the chosen page."""
    start_run()
    st.set_page_config(page_title="saekit feature browser", page_icon="🔎", layout="wide")
    st.html(CSS)
    src = resolve_sources(parse_args(argv), qp("sae"))
    page = navigation()
    store, stamp, problem = None, None, src.problem
    if problem is None and src.store is not None:
        try:
            stamp = store_stamp(src.store)
            store = open_store(str(src.store), stamp)
        except SaekitError as exc:
            problem = f"{exc}"
    sidebar(store, src)
    if page in ("lookup", "directions"):  # run-level results: no store needed
        report = RunLayout(src.run).run_report if src.run else None
        page_module = lookup_page if page == "lookup" else directions_page
        page_module.render(report, f"saekit {page} --config {config_of(src.run)}")
        return
    if store is None or src.store is None or stamp is None:
        page_missing(problem or "no store")
        return
    show(page, store, src, str(src.store), stamp)


if __name__ == "__main__":  # `streamlit run` puts the viewer's own arguments after the script in sys.argv
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])
