"""The feature list: search and filter units, page through them, open one. Every control is mirrored in the URL
(`?q=…&cls=…`), so a filtered list can be shared or bookmarked; a link's parameters win over the widgets' state.
"""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from features.store import FeatureStore, UnitQuery, UnitSummary
from features.viewer.markup import best_tag, short_tokens
from features.viewer.nav import done, goto, qp
from features.viewer.sources import Sources, label_hint

CLASSES = {"any": "any class", "monosemantic": "monosemantic", "polysemantic": "polysemantic", "dead": "dead",
           "dense": "dense"}
SORTS = {"idx": "index", "max_act": "max activation", "freq": "firing frequency", "mean_act": "mean activation",
         "n_fires": "firings", "semantic_score": "monosemanticity", "f1": "best tag F1"}
FREQ_STEPS = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
PAGE_SIZE = 50
LIST_PARAMS = ("kind", "q", "cls", "sort", "desc", "etype", "attr", "value", "fmin", "fmax", "p")


def render(store: FeatureStore, src: Sources, notice: str | None = None) -> None:
    """Search and filter units; `notice` (e.g. a bad unit id in the URL) is shown above the list."""
    if notice:
        st.warning(notice)
    st.title("Feature list")
    saved = _saved_state()
    search = _search_controls(store, saved)
    state = {**search, **_tag_controls(store, search["kind"], saved, src)}
    if state != {k: saved.get(k) for k in state}:
        saved.update(state)
        saved["p"] = "1"
    query = to_query(state)
    page = _pager(store.count(query), state["kind"], saved)
    url = {k: v for k, v in {**state, "p": str(page)}.items()
           if v not in ("", "any", "0.0") and not (k == "fmax" and v == "1.0")}
    st.session_state["_list_url"] = url
    st.query_params.from_dict({**({"sae": qp("sae")} if qp("sae") else {}), "page": "list", **url})
    rows = store.search(query, PAGE_SIZE, (page - 1) * PAGE_SIZE)
    if not rows:
        st.info("Nothing matches. Loosen a filter, or search for a token, a tag value or an index.")
        done("list")
        return
    _table(store, state, rows, page)
    done("list")


def _saved_state() -> dict[str, str]:
    """The list's controls as last set in this session; a link or bookmark (new URL parameters) replaces them."""
    saved: dict[str, str] = st.session_state.setdefault("_list", {})
    url = {k: st.query_params[k] for k in LIST_PARAMS if k in st.query_params}
    if url and url != st.session_state.get("_list_url"):
        saved.clear()
        saved.update(url)
        for key in [k for k in st.session_state if str(k).startswith("ls_")]:
            del st.session_state[key]
    return saved


def _choice(options: list[str] | dict[str, str], wanted: str) -> int:
    return list(options).index(wanted) if wanted in options else 0


def _search_controls(store: FeatureStore, saved: dict[str, str]) -> dict[str, str]:
    """First row: kind, search text, class, order."""
    kinds = [k for k in ("feature", "neuron") if store.n_units(k)]
    c = st.columns([1.1, 3, 1.4, 1.6, 1.2])
    kind = c[0].selectbox("Units", kinds, index=_choice(kinds, saved.get("kind") or "feature"),
                          format_func=lambda k: k + "s", key="ls_kind")
    query = c[1].text_input("Search label, concept or token", value=saved.get("q") or "", key="ls_q",
                            placeholder="e.g. Paris, country, capital, 123")
    cls = c[2].selectbox("Class", list(CLASSES), index=_choice(CLASSES, saved.get("cls") or "any"),
                         format_func=CLASSES.get, key="ls_cls")
    sort = c[3].selectbox("Sort by", list(SORTS), index=_choice(SORTS, saved.get("sort") or "max_act"),
                          format_func=SORTS.get, key="ls_sort")
    desc = c[4].toggle("Descending", value=(saved.get("desc") or "1") == "1", key="ls_desc")
    return {"kind": kind, "q": query, "cls": cls, "sort": sort, "desc": "1" if desc else "0"}


def _tag_controls(store: FeatureStore, kind: str, saved: dict[str, str], src: Sources) -> dict[str, str]:
    """Second row: a tag (entity type, attribute, value; each narrows the next) and a firing-frequency range."""
    c = st.columns([1.4, 1.4, 1.4, 3])
    tag_rows = store.tag_values(kind)
    types = ["any"] + sorted({t[0] for t in tag_rows})
    etype = c[0].selectbox("Tag: entity type", types, index=_choice(types, saved.get("etype") or "any"),
                           key="ls_etype", disabled=not tag_rows)
    attrs = ["any"] + sorted({t[1] for t in tag_rows if etype in ("any", t[0])})
    attr = c[1].selectbox("attribute", attrs, index=_choice(attrs, saved.get("attr") or "any"), key="ls_attr",
                          disabled=not tag_rows)
    values = ["any"] + sorted({t[2] for t in tag_rows if etype in ("any", t[0]) and attr in ("any", t[1])})
    value = c[2].selectbox("value", values, index=_choice(values, saved.get("value") or "any"), key="ls_value",
                           disabled=not tag_rows)
    fmin_d, fmax_d = _float(saved.get("fmin") or "0", 0.0), _float(saved.get("fmax") or "1", 1.0)
    near = [min(FREQ_STEPS, key=lambda x: abs(x - fmin_d)), min(FREQ_STEPS, key=lambda x: abs(x - fmax_d))]
    fmin, fmax = c[3].select_slider("Firing frequency", options=FREQ_STEPS, value=(near[0], near[1]),
                                    format_func=lambda x: f"{x:g}" if x in (0, 1) else f"{x:.0e}".replace("e-0", "e-"),
                                    key="ls_freq")
    if not tag_rows:
        st.caption(f"No tags to filter by yet; {label_hint(src)}.")
    return {"etype": etype, "attr": attr, "value": value, "fmin": repr(fmin), "fmax": repr(fmax)}


def to_query(state: dict[str, str]) -> UnitQuery:
    """The store query for the list's controls ("any" and the full frequency range filter nothing)."""
    cls, fmin, fmax = state["cls"], float(state["fmin"]), float(state["fmax"])
    tag = (state["etype"], state["attr"], state["value"])
    return UnitQuery(text=state["q"], kind=state["kind"], status=cls if cls in ("dead", "dense") else None,
                     semantic_class=cls if cls in ("monosemantic", "polysemantic") else None,
                     min_freq=fmin if fmin > 0 else None, max_freq=fmax if fmax < 1 else None,
                     tag=None if tag == ("any", "any", "any") else tuple(None if x == "any" else x for x in tag),
                     order_by=state["sort"], descending=state["desc"] == "1")


def _pager(total: int, kind: str, saved: dict[str, str]) -> int:
    """The match count and the page-number box; returns the 1-based page to show."""
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(int(_float(saved.get("p") or qp("p") or "1", 1)), 1), pages)
    c = st.columns([5, 1.2])
    c[0].markdown(f"**{total:,}** {kind}{'s match' if total != 1 else ' matches'}"
                  + (f" · page {page} of {pages}" if pages > 1 else ""))
    page = c[1].number_input("Page", min_value=1, max_value=pages, value=page, step=1, key=f"ls_page_{pages}",
                             label_visibility="collapsed", disabled=pages == 1)
    saved["p"] = str(page)
    return page


def _table(store: FeatureStore, state: dict[str, str], rows: list[UnitSummary], page: int) -> None:
    """The page of matches; selecting a row opens its unit here, the link column in a new tab."""
    kind = state["kind"]
    tags = {r.index: store.tags_for(kind, r.index) for r in rows}
    df = pd.DataFrame([{
        "id": r.index, "top tokens": short_tokens(r.top_tokens, 6), "best tag": best_tag(tags[r.index]),
        "class": r.semantic_class or "", "mono score": r.semantic_score, "freq": r.freq, "max act": r.max_act,
        "mean act": r.mean_act, "status": r.status, "top logits": short_tokens(r.pos_tokens, 5),
        "label": r.explanation or "", "open": f"?page={kind}&id={r.index}"} for r in rows])
    event = st.dataframe(
        df, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
        key=f"ls_table_{kind}_{page}_{hash(tuple(state.items()))}", height=min(len(df), 20) * 35 + 38,
        column_config={"freq": st.column_config.NumberColumn(format="%.2e"),
                       "max act": st.column_config.NumberColumn(format="%.3g"),
                       "mean act": st.column_config.NumberColumn(format="%.3g"),
                       "mono score": st.column_config.NumberColumn(format="%.2f"),
                       "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small")})
    if event and event.selection.rows:
        goto(kind, id=int(df.iloc[event.selection.rows[0]]["id"]))
    st.caption("Select a row to open its page here; \"open ↗\" opens it in a new tab.")


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default
