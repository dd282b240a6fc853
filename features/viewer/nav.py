"""Navigation by URL: the page and unit live in query parameters (`?page=feature&id=123`), so every view can be
shared, bookmarked or opened in a new tab, and links between units are plain links. Also the end-of-page marker
the benchmark and the browser test wait for.
"""

from __future__ import annotations

import html
import time
from typing import Any

import streamlit as st

from features.store import FeatureStore

PAGES = {"overview": "Overview", "list": "Feature list", "feature": "Feature page", "neuron": "Neuron page",
         "compare": "Compare", "live": "Live text", "steer": "Steering", "lookup": "Lookup by layer",
         "directions": "Attribute directions", "export": "Export"}


def qp(name: str, default: str | None = None) -> str | None:
    return st.query_params.get(name, default)


def unit_href(kind: str, index: int) -> str:
    """A link to a unit's page, keeping the run's chosen SAE."""
    extra = f"&sae={html.escape(qp('sae'), quote=True)}" if qp("sae") else ""
    return f"?page={kind}&amp;id={int(index)}{extra}"


def goto(page: str, **params: Any) -> None:
    """Switch page inside the session (no reload): set the URL's query and rerun."""
    keep = {"sae": qp("sae")} if qp("sae") else {}
    st.query_params.from_dict({**keep, "page": page, **{k: str(v) for k, v in params.items()}})
    st.session_state["_goto"] = page
    st.rerun()


def _nav_changed() -> None:
    page = st.session_state["nav"]
    keep = {k: st.query_params[k] for k in ("sae", "id") if k in st.query_params}
    st.query_params.from_dict({**keep, "page": page})


def navigation() -> str:
    """The sidebar's page menu, kept in step with `?page=` (links and goto() set it; the menu follows)."""
    wanted = qp("page") or ("feature" if qp("id") else "overview")
    if wanted not in PAGES:
        wanted = "overview"
    if "_goto" in st.session_state:
        st.session_state["nav"] = st.session_state.pop("_goto")
    elif "nav" not in st.session_state or st.session_state.get("_url_page") != wanted:
        st.session_state["nav"] = wanted
    st.session_state["_url_page"] = wanted
    st.sidebar.markdown("### saekit feature browser")
    st.sidebar.radio("Page", list(PAGES), format_func=PAGES.get, key="nav", on_change=_nav_changed,
                     label_visibility="collapsed")
    return st.session_state["nav"]


def unit_index(store: FeatureStore, kind: str) -> tuple[int | None, str | None]:
    """The unit the URL asks for (else the last one shown), or why it cannot be shown."""
    raw = qp("id")
    n = store.n_units(kind)
    if n == 0:
        return None, f"This store has no {kind}s (the analysis ran without them)."
    if raw is None:
        return st.session_state.get(f"_last_{kind}", 0), None
    try:
        idx = int(raw)
    except ValueError:
        return None, f"`{raw}` is not a {kind} id; {kind}s are numbered 0 to {n - 1:,}."
    if not 0 <= idx < n:
        return None, f"There is no {kind} {idx}: this store has {kind}s 0 to {n - 1:,}. Pick one from the list."
    return idx, None


def start_run() -> None:
    """Note when this script run began and count the session's runs, for `done`."""
    st.session_state["_t0"] = time.perf_counter()
    st.session_state["_runs"] = st.session_state.get("_runs", 0) + 1


def done(tag: str) -> None:
    """Marks the page as rendered, with the seconds its script took and the session's run number (the
    benchmark and the browser test wait for it)."""
    seconds = time.perf_counter() - st.session_state.get("_t0", time.perf_counter())
    st.html(f'<span class="sk-done" data-page="{html.escape(tag, quote=True)}" data-seconds="{seconds:.4f}" '
            f'data-run="{st.session_state.get("_runs", 0)}"></span>')
