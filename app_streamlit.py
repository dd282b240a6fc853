"""saekit's feature browser: `saekit view --run runs/<name>`, or
`streamlit run app_streamlit.py -- --store <features.db> --sae <SAE dir> [--model <name or HF dir>]`.

Presentation only: every number comes from the feature store (`features.store`), live text and steering from
`features.viewer_live`. Pages are chosen by query parameters (`?page=feature&id=123`, `?page=list&q=Paris`), so
every view has a URL that can be shared, bookmarked or opened in a new tab; links between units are plain links.
Options can also come from the environment (SAEKIT_VIEW_RUN, _STORE, _SAE, _MODEL, _DEVICE), which is how tests
and `saekit view` pass them.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from features.store import STORE_FILE, FeatureStore, Tag, Unit, density_note
from features.viewer_html import (
    CSS,
    concept_chip,
    example_html,
    histogram_html,
    logits_html,
    metrics_html,
    related_html,
    short_tokens,
    tags_html,
    tokens_html,
)
from features.viewer_live import MAX_LIVE_TOKENS, LiveModel, LiveText, load_live
from sae.errors import SaekitError

PAGES = {"overview": "Overview", "list": "Feature list", "feature": "Feature page", "neuron": "Neuron page",
         "compare": "Compare", "live": "Live text", "steer": "Steering", "export": "Export"}
CLASSES = {"any": "any class", "monosemantic": "monosemantic", "polysemantic": "polysemantic", "dead": "dead",
           "dense": "dense"}
SORTS = {"idx": "index", "max_act": "max activation", "freq": "firing frequency", "mean_act": "mean activation",
         "n_fires": "firings", "semantic_score": "monosemanticity", "f1": "best tag F1"}
FREQ_STEPS = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
PAGE_SIZE = 50
LIST_PARAMS = ("kind", "q", "cls", "sort", "desc", "etype", "attr", "value", "fmin", "fmax", "p")
LABEL_HINT = "run `saekit label --config {config}` to fill it"


# ---------------------------------------------------------------------------------------------
# Inputs: which store, which SAE, which model


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
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="app_streamlit.py", description="saekit feature browser")
    ap.add_argument("--run", default=env("SAEKIT_VIEW_RUN"), help="a run directory (runs/<name>)")
    ap.add_argument("--store", default=env("SAEKIT_VIEW_STORE"), help="a features.db (or the folder holding it)")
    ap.add_argument("--sae", default=env("SAEKIT_VIEW_SAE"), help="SAE directory, or an SAE id of --run")
    ap.add_argument("--model", default=env("SAEKIT_VIEW_MODEL"), help="model for live text (default: the run's)")
    ap.add_argument("--device", default=env("SAEKIT_VIEW_DEVICE", "cpu"))
    args, _ = ap.parse_known_args(list(argv))
    return args


def _analyze_hint(run: Path | None, sae: Path | None) -> str:
    config = f"{run}/config.yaml" if run is not None and (run / "config.yaml").is_file() else "<your config>"
    if sae is not None and run is None:
        return f"saekit analyze --config {config} --sae {sae}"
    return f"saekit analyze --config {config}" + (f" --sae {sae.name}" if sae is not None else "")


def resolve_sources(args: argparse.Namespace, chosen_sae: str | None = None) -> Sources:
    """Turn --run / --store / --sae into paths, or say precisely what is missing."""
    run = Path(args.run) if args.run else None
    sae_dir = Path(args.sae) if args.sae and Path(args.sae).is_dir() else None
    store = Path(args.store) if args.store else None
    ids: tuple[str, ...] = ()

    def out(problem: str | None) -> Sources:
        return Sources(store, sae_dir, args.model, args.device, run, ids, problem)

    if store is not None:
        if store.is_dir():
            store = store / STORE_FILE
        if sae_dir is None and (store.parent / "cfg.json").is_file():
            sae_dir = store.parent
        if not store.is_file():
            return out(f"There is no feature store at `{store}`. Build it with `{_analyze_hint(run, sae_dir)}`.")
        return out(None)
    if run is not None:
        if not run.is_dir():
            return out(f"The run directory `{run}` does not exist. Train one with `saekit run --config <config>` "
                       "(its outputs go to runs/<name>/).")
        saes = sorted(p.parent for p in (run / "saes").glob("*/cfg.json"))
        ids = tuple(p.name for p in saes)
        if args.sae and sae_dir is None:
            sae_dir = run / "saes" / args.sae
            if not sae_dir.is_dir():
                return out(f"Run `{run}` has no SAE `{args.sae}` (its SAEs: {', '.join(ids) or 'none'}).")
        if sae_dir is None:
            if not saes:
                return out(f"Run `{run}` has no trained SAE yet (no `{run}/saes/<id>/cfg.json`). Train one with "
                           f"`saekit run --config {run}/config.yaml`.")
            with_store = [p for p in saes if (p / STORE_FILE).is_file()]
            pick = [p for p in saes if p.name == chosen_sae] or with_store or saes
            sae_dir = pick[0]
    if sae_dir is not None:
        store = sae_dir / STORE_FILE
        if not store.is_file():
            return out(f"SAE `{sae_dir}` has no feature store yet (`{store}` is missing). Build it with "
                       f"`{_analyze_hint(run, sae_dir if run is None else sae_dir)}`.")
        return out(None)
    if args.sae:
        return out(f"`{args.sae}` is not an SAE directory. Point `--sae` to a folder with cfg.json and "
                   "sae_weights.safetensors, or use `--run runs/<name>`.")
    return out("No feature store was given. Start the viewer with `saekit view --run runs/<name>` (or "
               "`streamlit run app_streamlit.py -- --store <features.db> --sae <SAE dir>`); a run's store is built "
               "by `saekit analyze --config <config>`.")


def model_name(src: Sources, store: FeatureStore) -> str | None:
    """The model for live text: --model, else the run's model setting, else the SAE's metadata."""
    if src.model:
        return src.model
    run_cfg = store.meta.get("run_config") or {}
    name = (run_cfg.get("model") or {}).get("name")
    sae_meta = (store.meta.get("sae") or {}).get("metadata") or {}
    return name or sae_meta.get("model_name") or store.meta.get("model_name")


def _stamp(path: Path) -> tuple[int, int, int]:
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
    from sae.export import load_sae

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


# ---------------------------------------------------------------------------------------------
# Navigation


def qp(name: str, default: str | None = None) -> str | None:
    return st.query_params.get(name, default)


def unit_href(kind: str, index: int) -> str:
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


def sidebar(store: FeatureStore | None, src: Sources) -> None:
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


# ---------------------------------------------------------------------------------------------
# Pages


def done(tag: str) -> None:
    """Marks the page as rendered, with the seconds its script took and the session's run number (the
    benchmark and the browser test wait for it)."""
    seconds = time.perf_counter() - st.session_state.get("_t0", time.perf_counter())
    st.html(f'<span class="sk-done" data-page="{html.escape(tag, quote=True)}" data-seconds="{seconds:.4f}" '
            f'data-run="{st.session_state.get("_runs", 0)}"></span>')


def page_missing(problem: str) -> None:
    st.title("No feature store to browse")
    st.error(problem)
    st.markdown("The viewer reads a run's feature store (`runs/<name>/saes/<sae-id>/features.db`). The pipeline "
                "that builds one:")
    st.code("saekit run --config configs/smollm2_mlp.yaml            # cache, train, eval, analyze\n"
            "saekit analyze --config runs/<name>/config.yaml       # (re)build only the feature store\n"
            "saekit view --run runs/<name>                         # then browse it", language="bash")
    runs = sorted(p.parent.parent.parent for p in Path("runs").glob("*/saes/*/features.db")) if Path("runs").is_dir() \
        else []
    if runs:
        st.markdown("Runs here that have a store: "
                    + ", ".join(f"`saekit view --run {r}`" for r in dict.fromkeys(runs)))
    done("missing")


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def page_overview(store: FeatureStore, src: Sources, path: str, stamp: tuple[int, int, int]) -> None:
    s = store.summary()
    sae = s.get("sae") or {}
    ev = s.get("eval") or {}
    st.title(f"Overview · {s['sae_id'] or store.path.parent.name}")
    arch = sae.get("architecture", "?") + (f", k={sae['k']}" if sae.get("k") else "")
    st.caption(f"model **{s['model_name']}** · hook `{s['hook']}` · SAE {arch}, d_in {sae.get('d_in', '?')} → "
               f"{sae.get('d_sae', store.n_units('feature')):,} features · analysed over {s['n_tokens']:,} tokens "
               f"({s['n_sequences']:,} sequences) · store built {s.get('created') or '?'}")
    m = st.columns(6)
    m[0].metric("L0", _fmt(ev.get("l0"), ".1f"), help="mean number of features firing per token (held-out text)")
    m[1].metric("FVU", _fmt(ev.get("fvu")), help="fraction of variance unexplained by the reconstruction")
    m[2].metric("CE loss recovered", _fmt(ev.get("ce_loss_recovered")),
                help="share of the cross-entropy lost by zero-ablating the hook that splicing in the SAE recovers")
    units = s["units"]
    f = units.get("feature", {})
    m[3].metric("live features", f"{f.get('live', 0):,}", help="fire on some tokens, at most on the dense threshold")
    m[4].metric("dead features", f"{f.get('dead', 0):,}", help="never fired on the analysed tokens")
    m[5].metric("dense features", f"{f.get('dense', 0):,}", help="fire on more than the dense threshold of tokens")
    if not ev:
        st.caption("No eval.json beside the SAE: run `saekit eval` for L0, FVU and CE loss recovered.")
    if "neuron" in units:
        n = units["neuron"]
        st.caption(f"MLP neurons of the same layer (`{store.meta['analysis'].get('neuron_hook')}`): {n['total']:,} — "
                   f"{n['live']:,} live, {n['dead']:,} dead, {n['dense']:,} dense"
                   + (f" ({note})." if (note := density_note(n)) else "."))

    feats = unit_frame(path, stamp, "feature")
    neurons = unit_frame(path, stamp, "neuron")
    both = pd.concat([d for d in (feats, neurons) if len(d)], ignore_index=True)
    left, right = st.columns(2)
    with left:
        st.subheader("Firing frequency")
        fired = both[both["freq"] > 0]
        if len(fired):  # binned here: 40 bars go to the browser, not one row per unit
            logs = np.log10(fired["freq"].to_numpy(dtype=float))
            edges = np.linspace(logs.min(), logs.max() + 1e-9, 41)
            bars = pd.DataFrame([{"kind": kind, "from": lo, "to": hi, "units": int(n)}
                                 for kind in ("feature", "neuron")
                                 for lo, hi, n in zip(edges[:-1], edges[1:], np.histogram(
                                     logs[(fired["kind"] == kind).to_numpy()], edges)[0], strict=True) if n])
            chart = alt.Chart(bars).mark_rect(opacity=0.75).encode(
                x=alt.X("from:Q", title="log10 firing frequency (share of tokens)"), x2="to:Q",
                y=alt.Y("units:Q", title="units"), y2=alt.datum(0),
                color=alt.Color("kind:N", scale=alt.Scale(domain=["feature", "neuron"], range=["#f08c00", "#1c7ed6"])),
                tooltip=["kind:N", alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f"), "units:Q"])
            st.altair_chart(chart, width="stretch")
        dead = int((both["freq"] == 0).sum())
        st.caption(f"{dead:,} units never fired and are not shown." if dead else "Every unit fired at least once.")
    with right:
        has_sem = both["semantic_score"].notna().any()
        st.subheader("Monosemanticity vs frequency" if has_sem else "Max activation vs frequency")
        pts = both[both["freq"] > 0].copy()
        pts["log_freq"] = pts["freq"].map(math.log10)
        y = "semantic_score" if has_sem else "max_act"
        pts = pts[pts[y].notna()]
        pick = alt.selection_point(name="unit", fields=["kind", "idx"], on="click")
        chart = alt.Chart(pts).mark_circle(size=14, opacity=0.55).encode(
            x=alt.X("log_freq:Q", title="log10 firing frequency"),
            y=alt.Y(f"{y}:Q", title="monosemanticity score" if has_sem else "max activation"),
            color=alt.Color("kind:N", scale=alt.Scale(domain=["feature", "neuron"], range=["#f08c00", "#1c7ed6"])),
            tooltip=["kind:N", "idx:Q", "top_tokens:N", alt.Tooltip("freq:Q", format=".2e"), f"{y}:Q"],
        ).add_params(pick)
        event = st.altair_chart(chart, width="stretch", on_select="rerun", selection_mode="unit", key="ov_scatter")
        chosen = (event.get("selection") or {}).get("unit") if event else None
        if chosen:
            goto(chosen[0]["kind"], id=int(chosen[0]["idx"]))
        hint = LABEL_HINT.format(config=_cfg(src))
        st.caption("Click a point to open its page." + ("" if has_sem else
                                                        f" Monosemanticity scores appear here once the labeler ran "
                                                        f"({hint})."))

    left, right = st.columns(2)
    with left:
        st.subheader("Monosemantic share: neurons vs features")
        rows = []
        for kind, frame in (("feature", feats), ("neuron", neurons)):
            counts = frame["semantic_class"].value_counts() if len(frame) else {}
            for cls in ("monosemantic", "polysemantic", "dead"):
                c = int(counts.get(cls, 0))
                if c:
                    rows.append({"kind": kind, "class": cls, "units": c, "share": c / len(frame)})
        if rows:
            chart = alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
                x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"), title="share of units"),
                y=alt.Y("kind:N", title=None),
                color=alt.Color("class:N", scale=alt.Scale(domain=["monosemantic", "polysemantic", "dead"],
                                                           range=["#2f9e44", "#e8590c", "#adb5bd"])),
                tooltip=["kind:N", "class:N", "units:Q", alt.Tooltip("share:Q", format=".1%")])
            st.altair_chart(chart, width="stretch")
        else:
            st.info(f"No monosemanticity classes yet: {LABEL_HINT.format(config=_cfg(src))}.")
    with right:
        st.subheader("Probing: attributes read from units")
        probes = store.probes()
        if probes:
            df = pd.DataFrame([{"attribute": f"{p.entity_type}.{p.attribute}", "read from": p.kind + "s",
                                "accuracy": p.accuracy, "baseline": p.baseline, "method": p.method,
                                "train / test": f"{p.n_train} / {p.n_test}"} for p in probes])
            st.dataframe(df, hide_index=True, width="stretch",
                         column_config={"accuracy": st.column_config.ProgressColumn(min_value=0, max_value=1,
                                                                                   format="%.3f"),
                                        "baseline": st.column_config.NumberColumn(format="%.3f")})
        else:
            st.info(f"No probes yet: {LABEL_HINT.format(config=_cfg(src))}.")

    st.subheader("Best tagged units")
    tags = store.find_tags(limit=25)
    if tags:
        df = _tags_frame(tags, with_unit=True)
        event = st.dataframe(df, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                             key="ov_tags", column_config=_TAG_COLUMNS)
        if event and event.selection.rows:
            t = tags[event.selection.rows[0]]
            goto(t.kind, id=t.index)
        st.caption("Select a row to open the unit's page.")
    else:
        st.info("No tags yet: the labeler tests units against entity attributes; "
                f"{LABEL_HINT.format(config=_cfg(src))}.")
    done("overview")


def _cfg(src: Sources) -> str:
    return f"{src.run}/config.yaml" if src.run is not None else "<your config>"


_TAG_COLUMNS = {c: st.column_config.NumberColumn(format="%.3f") for c in ("precision", "recall", "F1", "AUROC",
                                                                         "causal effect")}


def _tags_frame(tags: Sequence[Tag], with_unit: bool = False) -> pd.DataFrame:
    rows = []
    for t in tags:
        row = {"unit": f"{t.kind} {t.index}"} if with_unit else {}
        ents = ", ".join(map(str, t.entities[:8])) + (f" … (+{len(t.entities) - 8})" if len(t.entities) > 8 else "")
        row.update({"entity type": t.entity_type, "attribute": t.attribute, "value": t.value,
                    "precision": t.precision, "recall": t.recall, "F1": t.f1, "AUROC": t.auroc, "support": t.support,
                    "causal effect": t.causal_effect, "causal check": t.causal_status or "", "entities": ents})
        rows.append(row)
    return pd.DataFrame(rows)


def page_list(store: FeatureStore, src: Sources, notice: str | None = None) -> None:
    """Search and filter units; every control is mirrored in the URL (?q=…&cls=…) so a list can be shared."""
    if notice:
        st.warning(notice)
    st.title("Feature list")
    saved: dict[str, str] = st.session_state.setdefault("_list", {})
    url = {k: st.query_params[k] for k in LIST_PARAMS if k in st.query_params}
    if url and url != st.session_state.get("_list_url"):  # a link or bookmark: the URL wins over the widgets
        saved.clear()
        saved.update(url)
        for key in [k for k in st.session_state if str(k).startswith("ls_")]:
            del st.session_state[key]

    def init(name: str, default: str) -> str:
        return saved.get(name) or default

    kinds = [k for k in ("feature", "neuron") if store.n_units(k)]
    c = st.columns([1.1, 3, 1.4, 1.6, 1.2])
    kind_default = init("kind", "feature")
    kind = c[0].selectbox("Units", kinds, index=kinds.index(kind_default) if kind_default in kinds else 0,
                          format_func=lambda k: k + "s", key="ls_kind")
    query = c[1].text_input("Search label, concept or token", value=init("q", ""), key="ls_q",
                            placeholder="e.g. Paris, country, capital, 123")
    cls_default = init("cls", "any")
    cls = c[2].selectbox("Class", list(CLASSES), index=list(CLASSES).index(cls_default) if cls_default in CLASSES
                         else 0, format_func=CLASSES.get, key="ls_cls")
    sort_default = init("sort", "max_act")
    sort = c[3].selectbox("Sort by", list(SORTS), index=list(SORTS).index(sort_default) if sort_default in SORTS
                          else 0, format_func=SORTS.get, key="ls_sort")
    desc = c[4].toggle("Descending", value=init("desc", "1") == "1", key="ls_desc")

    c = st.columns([1.4, 1.4, 1.4, 3])
    tag_rows = store.tag_values(kind)
    types = ["any"] + sorted({t[0] for t in tag_rows})
    t_default = init("etype", "any")
    etype = c[0].selectbox("Tag: entity type", types, index=types.index(t_default) if t_default in types else 0,
                           key="ls_etype", disabled=not tag_rows)
    attrs = ["any"] + sorted({t[1] for t in tag_rows if etype in ("any", t[0])})
    a_default = init("attr", "any")
    attr = c[1].selectbox("attribute", attrs, index=attrs.index(a_default) if a_default in attrs else 0,
                          key="ls_attr", disabled=not tag_rows)
    values = ["any"] + sorted({t[2] for t in tag_rows if etype in ("any", t[0]) and attr in ("any", t[1])})
    v_default = init("value", "any")
    value = c[2].selectbox("value", values, index=values.index(v_default) if v_default in values else 0,
                           key="ls_value", disabled=not tag_rows)
    fmin_d, fmax_d = _float(init("fmin", "0"), 0.0), _float(init("fmax", "1"), 1.0)
    near = [min(FREQ_STEPS, key=lambda x: abs(x - fmin_d)), min(FREQ_STEPS, key=lambda x: abs(x - fmax_d))]
    fmin, fmax = c[3].select_slider("Firing frequency", options=FREQ_STEPS, value=(near[0], near[1]),
                                    format_func=lambda x: f"{x:g}" if x in (0, 1) else f"{x:.0e}".replace("e-0", "e-"),
                                    key="ls_freq")
    if not tag_rows:
        st.caption(f"No tags to filter by yet; {LABEL_HINT.format(config=_cfg(src))}.")

    state = {"kind": kind, "q": query, "cls": cls, "sort": sort, "desc": "1" if desc else "0", "etype": etype,
             "attr": attr, "value": value, "fmin": repr(fmin), "fmax": repr(fmax)}
    if state != {k: saved.get(k) for k in state}:
        saved.update(state)
        saved["p"] = "1"
    filters: dict[str, Any] = {
        "status": cls if cls in ("dead", "dense") else None,
        "semantic_class": cls if cls in ("monosemantic", "polysemantic") else None,
        "min_freq": fmin if fmin > 0 else None, "max_freq": fmax if fmax < 1 else None,
        "tag": None if (etype, attr, value) == ("any", "any", "any") else
        tuple(None if x == "any" else x for x in (etype, attr, value))}
    total = store.count(query, kind, **filters)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(int(_float(saved.get("p") or qp("p") or "1", 1)), 1), pages)
    c = st.columns([5, 1.2])
    c[0].markdown(f"**{total:,}** {kind}{'s match' if total != 1 else ' matches'}"
                  + (f" · page {page} of {pages}" if pages > 1 else ""))
    page = c[1].number_input("Page", min_value=1, max_value=pages, value=page, step=1, key=f"ls_page_{pages}",
                             label_visibility="collapsed", disabled=pages == 1)
    saved["p"] = str(page)
    url = {k: v for k, v in {**state, "p": str(page)}.items()
           if v not in ("", "any", "0.0") and not (k == "fmax" and v == "1.0")}
    st.session_state["_list_url"] = url
    st.query_params.from_dict({**({"sae": qp("sae")} if qp("sae") else {}), "page": "list", **url})
    rows = store.search(query, kind, PAGE_SIZE, (page - 1) * PAGE_SIZE, order_by=sort, descending=desc, **filters)
    if not rows:
        st.info("Nothing matches. Loosen a filter, or search for a token, a tag value or an index.")
        done("list")
        return
    tags = {r.index: store.tags_for(kind, r.index) for r in rows}
    df = pd.DataFrame([{
        "id": r.index, "top tokens": short_tokens(r.top_tokens, 6), "best tag": _best_tag(tags[r.index]),
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
    done("list")


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text is not None else default
    except ValueError:
        return default


def _best_tag(tags: Sequence[Tag]) -> str:
    if not tags:
        return ""
    t = tags[0]
    return f"{t.entity_type}.{t.attribute}={t.value}" + (f" (F1 {t.f1:.2f})" if t.f1 is not None else "")


def _unit_index(store: FeatureStore, kind: str) -> tuple[int | None, str | None]:
    """The unit the URL asks for, or why it cannot be shown."""
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


def page_unit(store: FeatureStore, src: Sources, kind: str) -> None:
    """A unit's page. Built from a few large HTML blocks rather than many widgets: this is the page people
    flip through, and each widget costs the browser more than the same content as HTML."""
    idx, problem = _unit_index(store, kind)
    if idx is None:
        page_list(store, src, notice=problem)
        return
    try:
        u = store.unit(kind, idx)
    except SaekitError as exc:
        page_list(store, src, notice=str(exc))
        return
    st.session_state[f"_last_{kind}"] = idx
    other = "neuron" if kind == "feature" else "feature"
    head = st.columns([5, 0.9, 0.9, 1.8], vertical_alignment="bottom")
    head[0].title(f"{kind.capitalize()} {idx}")
    if head[1].button("◀ prev", disabled=idx == 0, key="u_prev", width="stretch"):
        goto(kind, id=idx - 1)
    if head[2].button("next ▶", disabled=idx + 1 >= store.n_units(kind), key="u_next", width="stretch"):
        goto(kind, id=idx + 1)
    if head[3].button(f"Compare with {other}s", key="u_cmp", disabled=not store.n_units(other), width="stretch"):
        goto("compare", kind=kind, id=idx)
    hook = store.meta["analysis"]["sae_hook" if kind == "feature" else "neuron_hook"]
    line = [f"<code>{html.escape(hook)}</code>", f"<b>{u.status}</b>"]
    if u.semantics is not None:
        line.append(f"{u.semantics.cls} (score {_fmt(u.semantics.score, '.2f')})")
    if u.tags:
        line.append(f"best tag <b>{html.escape(_best_tag(u.tags))}</b>")
    if u.explanation:
        line.append(f"“{html.escape(u.explanation)}”")
    st.html(f'<div class="sk-line">{" · ".join(line)}</div>' + metrics_html([
        ("firing frequency", f"{u.freq:.3%}", "share of the analysed tokens on which it is > 0"),
        ("firings", f"{u.n_fires:,}", "analysed tokens on which it is > 0"),
        ("max activation", f"{u.max_act:.3g}", "largest activation on the analysed tokens"),
        ("mean activation", f"{u.mean_act:.3g}", "mean over the tokens where it fires"),
        ("monosemanticity", _fmt(u.semantics.score if u.semantics else None, ".2f"),
         "from the labeler (saekit label)")]))
    hint = html.escape(LABEL_HINT.format(config=_cfg(src)).replace("`", ""))

    left, right = st.columns([3, 2], gap="large")
    with left:
        parts = ['<div class="sk-h">Top activations</div>']
        if u.top_examples:
            parts += [example_html(e, u.max_act) for e in u.top_examples]
            parts.append('<div class="sk-note">Background in proportion to the activation (hover a token for its '
                         "value); the outlined token is the example's own, the grey number its activation. At most "
                         "one example per sequence.</div>")
        else:
            parts.append('<div class="sk-hint">This unit never fired on the analysed text.</div>')
        if u.intervals:
            parts.append('<div class="sk-h">Across the activation range</div><div class="sk-note">Uniform samples '
                         "from equal-width activation intervals, highest first, with each interval's share of all "
                         'firings.</div><div class="sk-scroll">')
            for iv in sorted(u.intervals, key=lambda iv: -iv.min):
                parts.append(f'<div class="sk-iv"><b>[{iv.min:.3g}, {iv.max:.3g})</b> · {iv.count:,} firings · '
                             f'{iv.share:.1%} of all<span class="sk-bar" style="width:{max(iv.share * 160, 1):.0f}px">'
                             "</span></div>")
                parts += [example_html(e, u.max_act) for e in iv.examples]
            parts.append("</div>")
        st.html("".join(parts))
    with right:
        parts = ['<div class="sk-h">Activation histogram</div>', histogram_html(u.hist_edges, u.hist_counts)]
        if u.pos_logits or u.neg_logits:
            parts.append('<div class="sk-h">Output logits</div><div class="sk-cols2">'
                         f'<div>{logits_html("promoted", u.pos_logits, "#2f9e44")}</div>'
                         f'<div>{logits_html("suppressed", u.neg_logits, "#c92a2a")}</div></div>')
        parts.append('<div class="sk-h">Tags</div>')
        parts.append(tags_html(u.tags) if u.tags else f'<div class="sk-hint">No tags for this {kind}; {hint}.</div>')
        parts.append('<div class="sk-h">Monosemanticity</div>')
        if u.semantics is not None:
            parts.append(f"<div><b>{html.escape(u.semantics.cls)}</b>, score {_fmt(u.semantics.score, '.3f')}"
                         + (" · concepts found:" if u.semantics.concepts else "") + "</div>")
            parts += [concept_chip(c) for c in u.semantics.concepts]
        else:
            parts.append(f'<div class="sk-hint">Not scored yet; {hint}.</div>')
        st.html("".join(parts))
        _downloads(store, src, u)
    _related(store, u)
    done(f"{kind}-{idx}")


def _related(store: FeatureStore, u: Unit) -> None:
    other = "neuron" if u.kind == "feature" else "feature"
    groups = [(u.kind, f"Nearest {u.kind}s", "cosine", u.neighbours),
              (u.kind, f"Co-firing {u.kind}s", "share", u.cofiring),
              (other, f"Most correlated {other}s", "Pearson r", u.correlated)]
    if u.kind == "feature":
        groups.append(("neuron", "Aligned neurons (decoder · W_out)", "cosine", u.aligned))
    summaries = {k: store.summaries(k, [i for kk, _, _, pairs in groups if kk == k for i, _ in pairs])
                 for k in {g[0] for g in groups}}
    cells = "".join(f'<div><div class="sk-legend"><b>{html.escape(title)}</b></div>'
                    f"{related_html(k, pairs, summaries[k], unit_href, value_name)}</div>"
                    for k, title, value_name, pairs in groups)
    st.html(f'<div class="sk-h">Related units</div><div class="sk-grid">{cells}</div>')


def _downloads(store: FeatureStore, src: Sources, u: Unit) -> None:
    """The feature's decoder vector (copy or download) and its Neuronpedia-style JSON."""
    from features.export import neuronpedia_feature

    m = store.meta

    def np_json() -> str:
        dataset = ((m.get("run_config") or {}).get("corpus") or {}).get("source", "")
        return json.dumps(neuronpedia_feature(u, m["n_tokens"], m["n_sequences"], m["analysis"]["context_size"],
                                              dataset))

    st.html(f'<div class="sk-h">{"Decoder vector" if u.kind == "feature" else "Export"}</div>')
    c = st.columns(2)
    c[1].download_button("Neuronpedia JSON", np_json, file_name=f"{u.kind}-{u.index}-neuronpedia.json",
                         mime="application/json", key="u_np_dl", width="stretch")
    if u.kind != "feature":
        return
    if src.sae_dir is None:
        st.caption("No SAE directory given (start with --sae or --run), so the decoder vector is not available.")
        return
    try:
        sae = open_sae(str(src.sae_dir))
    except SaekitError as exc:
        st.caption(f"The SAE could not be loaded: {exc}")
        return
    vec = [round(float(x), 6) for x in sae.W_dec[u.index].detach().float().tolist()]
    payload = {"sae_id": m.get("sae_id"), "hook_name": sae.cfg.hook_name_out or sae.cfg.hook_name,
               "feature": u.index, "d": len(vec), "norm": math.sqrt(sum(x * x for x in vec)), "decoder": vec}
    c[0].download_button("Decoder vector (JSON)", lambda: json.dumps(payload),
                         file_name=f"feature-{u.index}-decoder.json", mime="application/json", key="u_dec_dl",
                         width="stretch")
    st.caption(f"{len(vec)} weights, norm {payload['norm']:.4f}, written at `{payload['hook_name']}`. The JSON "
               "holds the vector under `decoder`.")


def page_compare(store: FeatureStore, src: Sources) -> None:
    """One unit beside the units of the other kind that explain it: polysemanticity shown, not asserted."""
    kind = qp("kind", "neuron")
    kind = kind if kind in ("feature", "neuron") else "neuron"
    other = "neuron" if kind == "feature" else "feature"
    if not store.n_units(other) or not store.n_units(kind):
        st.title("Compare")
        st.info("Comparing needs both features and neurons in the store; this one was analysed without neurons "
                "(analyze.neurons: false).")
        done("compare")
        return
    idx, problem = _unit_index(store, kind)
    idx = idx if idx is not None else 0
    st.title(f"{kind.capitalize()} {idx} beside the {other}s " +
             ("that explain it" if kind == "neuron" else "it is spread over"))
    c = st.columns([1.2, 1.2, 5])
    picked = c[0].selectbox("Unit", ["neuron", "feature"], index=["neuron", "feature"].index(kind),
                            key=f"cmp_kind_{kind}_{idx}")
    new = c[1].number_input("id", min_value=0, max_value=store.n_units(kind) - 1, value=int(idx), step=1,
                            key=f"cmp_id_{kind}_{idx}")
    if picked != kind:
        goto("compare", kind=picked, id=0)
    if new != idx:
        goto("compare", kind=kind, id=int(new))
    if problem:
        st.warning(problem)
    u = store.unit(kind, idx)
    spread = dict(u.correlated)
    if kind == "feature":
        for i, _ in u.aligned:
            spread.setdefault(i, 0.0)
    st.caption(f"Right: the {other}s whose activations correlate most with this {kind} over the analysed tokens "
               f"(Pearson r){' and those aligned with its decoder direction' if kind == 'feature' else ''}. "
               "If the left column mixes unrelated contexts and each right-hand unit takes one of them, the "
               f"{kind} is polysemantic and the {other}s split it.")
    left, right = st.columns([1, 1], gap="large")
    with left:
        _unit_card(u, n_examples=12, tags=True)
    with right:
        for i, r in sorted(spread.items(), key=lambda kv: -abs(kv[1]))[:6]:
            v = store.unit(other, i)
            with st.container(border=True):
                _unit_card(v, n_examples=3, tags=True, note=f"r = {r:+.3f}" if r else "aligned (decoder · W_out)")
        if not spread:
            st.info(f"No correlated {other}s were recorded for this {kind}.")
    done(f"compare-{kind}-{idx}")


def _unit_card(u: Unit, n_examples: int, tags: bool, note: str | None = None) -> None:
    cls = f" · {u.semantics.cls}" if u.semantics else ""
    head = (f'<a href="{unit_href(u.kind, u.index)}"><b>{u.kind.capitalize()} {u.index}</b></a>'
            f'<span class="sk-legend"> · {html.escape(note) + " · " if note else ""}freq {u.freq:.2%} · max '
            f"{u.max_act:.3g}{cls}</span>")
    chips = ""
    if tags and u.tags:
        chips = "<div>" + "".join(f'<span class="sk-chip">{html.escape(_best_tag([t]))}</span>' for t in u.tags[:4]) \
            + "</div>"
    toks = f'<div class="sk-legend">top tokens: {html.escape(short_tokens(u.top_tokens, 8))}</div>'
    st.html(f"<div>{head}</div>{chips}{toks}" + "".join(example_html(e, u.max_act)
                                                        for e in u.top_examples[:n_examples]))


def _live_off(reason: str, src: Sources) -> None:
    st.warning(f"Live text is off: {reason}")
    st.caption("The browsing pages do not need the model. To turn live text on, start the viewer with "
               "`--model <name or local HF directory>` naming the model the SAE was trained on"
               + ("" if src.sae_dir else " and `--sae <SAE directory>`") + ".")


def page_live(store: FeatureStore, src: Sources) -> None:
    st.title("Live text")
    st.caption(f"Runs the model up to `{store.meta['analysis']['sae_hook']}` and the SAE on your text. At most "
               f"{MAX_LIVE_TOKENS} tokens; longer input is cut.")
    live, reason = open_live(str(src.sae_dir) if src.sae_dir else None, model_name(src, store), src.device)
    if live is None:
        _live_off(reason or "unknown reason", src)
        done("live")
        return
    with st.form("live_form", border=False):
        text = st.text_area("Text", value=st.session_state.get("_live_text", "The Eiffel Tower is in Paris, the "
                            "capital of France. Tokyo is the capital of Japan, where people speak Japanese."),
                            height=110, key="live_text_input")
        run = st.form_submit_button("Run", type="primary")
    stale = st.session_state.get("_live_sae") != str(src.sae_dir)
    if run or stale or "_live" not in st.session_state:  # the example text runs on the first visit
        st.session_state["_live_text"], st.session_state["_live_sae"] = text, str(src.sae_dir)
        st.session_state["_live"] = live.run(text)
    res: LiveText = st.session_state["_live"]
    if res.cut:
        st.info(f"The text was cut to its first {MAX_LIVE_TOKENS} tokens ({res.cut:,} more were left out).")
    if not res.tokens:
        st.info("No tokens to show.")
        done("live")
        return
    best = [max((v for f, v in res.top(t, 1)), default=0.0) for t in range(len(res.tokens))]
    scale = max(best) or 1.0
    titles = [f"{t!r}: " + (", ".join(f"#{f} {v:.2f}" for f, v in res.top(i, 5)) or "no feature fires")
              for i, t in enumerate(res.tokens)]
    st.subheader("Strongest feature per token")
    st.html(tokens_html(res.tokens, best, scale, titles=titles))
    st.caption("Background: the strongest feature's activation at each token; hover for the top features there.")
    strongest = res.strongest(30)
    summaries = store.summaries("feature", [f for f, _, _ in strongest])
    st.subheader("Features on this text")
    left, right = st.columns([3, 2], gap="large")
    with left:
        df = pd.DataFrame([{"feature": f, "max act": m, "tokens": c,
                            "top tokens": short_tokens(summaries[f].top_tokens, 5) if f in summaries else "",
                            "label": (summaries[f].explanation or "") if f in summaries else ""}
                           for f, m, c in strongest])
        event = st.dataframe(df, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                             key=f"live_table_{hash(tuple(res.token_ids))}",
                             column_config={"max act": st.column_config.NumberColumn(format="%.3g")})
        if event and event.selection.rows:
            goto("feature", id=int(df.iloc[event.selection.rows[0]]["feature"]))
        st.caption("Select a row to open the feature's page.")
    with right:
        f = st.selectbox("Show one feature across the text", [f for f, _, _ in strongest],
                         format_func=lambda f: f"#{f} · " + (short_tokens(summaries[f].top_tokens, 4)
                                                               if f in summaries else ""), key="live_pick")
        if f is not None:
            acts = res.of_feature(int(f)).tolist()
            st.html(tokens_html(res.tokens, acts, max(acts) or 1.0))
            st.html(f'<a href="{unit_href("feature", int(f))}">open feature {int(f)} →</a>')
        with st.expander("Per-token table"):
            st.dataframe(pd.DataFrame([{"pos": i, "token": repr(t)[1:-1],
                                        "features": ", ".join(f"#{f} ({v:.2f})" for f, v in res.top(i, 5))}
                                       for i, t in enumerate(res.tokens)]), hide_index=True, width="stretch")
    done("live")


def page_steer(store: FeatureStore, src: Sources) -> None:
    st.title("Steering")
    live, reason = open_live(str(src.sae_dir) if src.sae_dir else None, model_name(src, store), src.device)
    if live is None:
        _live_off(reason or "unknown reason", src)
        done("steer")
        return
    n = store.n_units("feature")
    idx, _ = _unit_index(store, "feature")
    with st.form("steer_form", border=False):
        c = st.columns([1, 1.4, 1])
        feature = c[0].number_input("Feature", min_value=0, max_value=n - 1, value=int(idx or 0), step=1)
        mult = c[1].slider("Multiplier", min_value=-20.0, max_value=20.0, value=2.0, step=0.5)
        n_tok = c[2].slider("New tokens", min_value=5, max_value=60, value=24, step=1)
        prompt = st.text_input("Prompt", value="My favourite place to visit is")
        go = st.form_submit_button("Generate", type="primary")
    f = store.feature(int(feature))
    scale = f.max_act if f.max_act > 0 else 1.0
    st.caption(f"Adds multiplier × {scale:.3g} (feature {int(feature)}'s max activation"
               f"{'' if f.max_act > 0 else ': it never fired, so 1'}) × its decoder direction at "
               f"`{live.write_hook}`, at every position; both continuations are greedy. "
               f"Feature {int(feature)}'s top tokens: {short_tokens(f.top_tokens, 6)}.")
    if go:
        st.session_state["_steer"] = (int(feature), mult, prompt,
                                      live.generate(prompt, n_tok), live.generate(prompt, n_tok, int(feature),
                                                                                  mult * scale))
    res = st.session_state.get("_steer")
    if res:
        fid, m, p, plain, steered = res
        c = st.columns(2)
        c[0].markdown("**Without steering**")
        c[0].html(f'<div class="sk-ex"><b>{html.escape(p)}</b>{html.escape(plain)}</div>')
        c[1].markdown(f"**With feature {fid} × {m:g}**")
        c[1].html(f'<div class="sk-ex"><b>{html.escape(p)}</b>{html.escape(steered)}</div>')
    done("steer")


def page_export(store: FeatureStore, src: Sources, path: str, stamp: tuple[int, int, int]) -> None:
    from features import export

    st.title("Export")
    sae_id = store.meta.get("sae_id") or store.path.parent.name

    def zipped(build: Callable[[Path], Path]) -> Callable[[], bytes]:
        return lambda: zip_folder(build, sae_id)

    st.subheader("SAE-Lens bundle")
    st.markdown("The SAE directory (cfg.json, weights, sparsity, eval) with `features.db` and a README.json: "
                "`sae_lens.SAE.load_from_disk(folder)` and `sqlite3` read it as is.")
    if src.sae_dir is not None and (src.sae_dir / "cfg.json").is_file():
        st.download_button("Download bundle (.zip)", zipped(lambda out: export.export_bundle(src.sae_dir, out)),
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


# ---------------------------------------------------------------------------------------------


def main() -> None:
    st.session_state["_t0"] = time.perf_counter()
    st.session_state["_runs"] = st.session_state.get("_runs", 0) + 1
    st.set_page_config(page_title="saekit feature browser", page_icon="🔎", layout="wide")
    st.html(CSS)
    argv = sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else []
    src = resolve_sources(parse_args(argv), qp("sae"))
    page = navigation()
    store, problem = None, src.problem
    if problem is None and src.store is not None:
        try:
            stamp = _stamp(src.store)
            store = open_store(str(src.store), stamp)
        except SaekitError as exc:
            problem = f"{exc}"
    sidebar(store, src)
    if store is None or src.store is None:
        page_missing(problem or "no store")
        return
    path = str(src.store)
    if page == "overview":
        page_overview(store, src, path, stamp)
    elif page == "list":
        page_list(store, src)
    elif page in ("feature", "neuron"):
        page_unit(store, src, page)
    elif page == "compare":
        page_compare(store, src)
    elif page == "live":
        page_live(store, src)
    elif page == "steer":
        page_steer(store, src)
    elif page == "export":
        page_export(store, src, path, stamp)


if __name__ == "__main__":
    main()
