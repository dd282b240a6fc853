"""The overview page: the SAE's headline metrics, frequency and monosemanticity plots over all units, probes and
the best tagged units. Plots are binned or drawn from the cached unit tables, so the page stays fast on big SAEs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from features.labeling.significance import bootstrap_ci
from features.store import FeatureStore, Tag, density_note
from features.viewer.markup import fmt
from features.viewer.nav import done, goto
from features.viewer.sources import Sources, label_hint, unit_frame

KIND_COLOURS = alt.Scale(domain=["feature", "neuron"], range=["#f08c00", "#1c7ed6"])
TAG_COLUMNS = {c: st.column_config.NumberColumn(format="%.3f") for c in ("precision", "recall", "F1", "AUROC",
                                                                        "causal effect")}


def render(store: FeatureStore, src: Sources, path: str, stamp: tuple[int, int, int]) -> None:
    _headline(store)
    feats = unit_frame(path, stamp, "feature")
    neurons = unit_frame(path, stamp, "neuron")
    both = pd.concat([d for d in (feats, neurons) if len(d)], ignore_index=True)
    left, right = st.columns(2)
    with left:
        _frequency_chart(both)
    with right:
        _scatter(both, src)
    left, right = st.columns(2)
    with left:
        _monosemantic_share(feats, neurons, src)
    with right:
        _probes(store, src)
    _best_tags(store, src)
    done("overview")


def _headline(store: FeatureStore) -> None:
    """Title, what was analysed, and the SAE's quality and liveness figures."""
    s = store.summary()
    sae = s.get("sae") or {}
    ev = s.get("eval") or {}
    st.title(f"Overview · {s['sae_id'] or store.path.parent.name}")
    arch = sae.get("architecture", "?") + (f", k={sae['k']}" if sae.get("k") else "")
    st.caption(f"model **{s['model_name']}** · hook `{s['hook']}` · SAE {arch}, d_in {sae.get('d_in', '?')} → "
               f"{sae.get('d_sae', store.n_units('feature')):,} features · analysed over {s['n_tokens']:,} tokens "
               f"({s['n_sequences']:,} sequences) · store built {s.get('created') or '?'}")
    m = st.columns(6)
    m[0].metric("L0", fmt(ev.get("l0"), ".1f"), help="mean number of features firing per token (held-out text)")
    m[1].metric("FVU", fmt(ev.get("fvu")), help="fraction of variance unexplained by the reconstruction")
    m[2].metric("CE loss recovered", fmt(ev.get("ce_loss_recovered")),
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


def _frequency_chart(both: pd.DataFrame) -> None:
    """Firing frequencies, binned here: 40 bars go to the browser, not one row per unit."""
    st.subheader("Firing frequency")
    fired = both[both["freq"] > 0]
    if len(fired):
        logs = np.log10(fired["freq"].to_numpy(dtype=float))
        edges = np.linspace(logs.min(), logs.max() + 1e-9, 41)
        bars = pd.DataFrame([{"kind": kind, "from": lo, "to": hi, "units": int(n)}
                             for kind in ("feature", "neuron")
                             for lo, hi, n in zip(edges[:-1], edges[1:], np.histogram(
                                 logs[(fired["kind"] == kind).to_numpy()], edges)[0], strict=True) if n])
        chart = alt.Chart(bars).mark_rect(opacity=0.75).encode(
            x=alt.X("from:Q", title="log10 firing frequency (share of tokens)"), x2="to:Q",
            y=alt.Y("units:Q", title="units"), y2=alt.datum(0), color=alt.Color("kind:N", scale=KIND_COLOURS),
            tooltip=["kind:N", alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f"), "units:Q"])
        st.altair_chart(chart, width="stretch")
    dead = int((both["freq"] == 0).sum())
    st.caption(f"{dead:,} units never fired and are not shown." if dead else "Every unit fired at least once.")


def _scatter(both: pd.DataFrame, src: Sources) -> None:
    """Monosemanticity (or, before the labeler ran, max activation) against frequency; a click opens the unit."""
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
        color=alt.Color("kind:N", scale=KIND_COLOURS),
        tooltip=["kind:N", "idx:Q", "top_tokens:N", alt.Tooltip("freq:Q", format=".2e"), f"{y}:Q"],
    ).add_params(pick)
    event = st.altair_chart(chart, width="stretch", on_select="rerun", selection_mode="unit", key="ov_scatter")
    chosen = (event.get("selection") or {}).get("unit") if event else None
    if chosen:
        goto(chosen[0]["kind"], id=int(chosen[0]["idx"]))
    st.caption("Click a point to open its page." + ("" if has_sem else
                                                    f" Monosemanticity scores appear here once the labeler ran "
                                                    f"({label_hint(src)})."))


def _monosemantic_share(feats: pd.DataFrame, neurons: pd.DataFrame, src: Sources) -> None:
    st.subheader("Monosemantic share: neurons vs features")
    rows = []
    for kind, frame in (("feature", feats), ("neuron", neurons)):
        counts = frame["semantic_class"].value_counts() if len(frame) else {}
        for cls in ("monosemantic", "polysemantic", "dead"):
            c = int(counts.get(cls, 0))
            if c:
                rows.append({"kind": kind, "class": cls, "units": c, "share": c / len(frame)})
    if not rows:
        st.info(f"No monosemanticity classes yet: {label_hint(src)}.")
        return
    chart = alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
        x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"), title="share of units"),
        y=alt.Y("kind:N", title=None),
        color=alt.Color("class:N", scale=alt.Scale(domain=["monosemantic", "polysemantic", "dead"],
                                                   range=["#2f9e44", "#e8590c", "#adb5bd"])),
        tooltip=["kind:N", "class:N", "units:Q", alt.Tooltip("share:Q", format=".1%")])
    st.altair_chart(chart, width="stretch")
    st.caption(_share_caption(feats, neurons))


def _share_caption(feats: pd.DataFrame, neurons: pd.DataFrame) -> str:
    """The monosemantic share among units that are not dead, per kind, with its 95% bootstrap interval over
    units, and the rule that makes the two kinds comparable."""
    parts = []
    for kind, frame in (("features", feats), ("neurons", neurons)):
        alive = frame[frame["semantic_class"].isin(["monosemantic", "polysemantic"])] if len(frame) else frame
        if len(alive):
            ci = bootstrap_ci((alive["semantic_class"] == "monosemantic").to_numpy(dtype=float))
            parts.append(f"{kind} {ci.value:.1%} [{ci.lo:.1%}, {ci.hi:.1%}] of {len(alive):,}")
    return ("Monosemantic share among units that are not dead (95% bootstrap over units): " + "; ".join(parts)
            + ". Both kinds are judged by one rule: a feature is on above 0, a neuron above its own threshold that "
            "makes it fire as often as the median live feature.")


def _probes(store: FeatureStore, src: Sources) -> None:
    st.subheader("Probing: attributes read from units")
    probes = store.probes()
    if not probes:
        st.info(f"No probes yet: {label_hint(src)}.")
        return
    df = pd.DataFrame([{"attribute": f"{p.entity_type}.{p.attribute}", "read from": p.kind + "s",
                        "accuracy": p.accuracy, "baseline": p.baseline, "method": p.method,
                        "train / test": f"{p.n_train} / {p.n_test}"} for p in probes])
    st.dataframe(df, hide_index=True, width="stretch",
                 column_config={"accuracy": st.column_config.ProgressColumn(min_value=0, max_value=1, format="%.3f"),
                                "baseline": st.column_config.NumberColumn(format="%.3f")})


def _best_tags(store: FeatureStore, src: Sources) -> None:
    st.subheader("Best tagged units")
    tags = store.find_tags(limit=25)
    if not tags:
        st.info(f"No tags yet: the labeler tests units against entity attributes; {label_hint(src)}.")
        return
    event = st.dataframe(tags_frame(tags), hide_index=True, width="stretch", on_select="rerun",
                         selection_mode="single-row", key="ov_tags", column_config=TAG_COLUMNS)
    if event and event.selection.rows:
        t = tags[event.selection.rows[0]]
        goto(t.kind, id=t.index)
    st.caption("Select a row to open the unit's page.")


def tags_frame(tags: Sequence[Tag]) -> pd.DataFrame:
    """One row per tag with its unit, scores and (the first few) entities."""
    rows = []
    for t in tags:
        ents = ", ".join(map(str, t.entities[:8])) + (f" … (+{len(t.entities) - 8})" if len(t.entities) > 8 else "")
        rows.append({"unit": f"{t.kind} {t.index}", "entity type": t.entity_type, "attribute": t.attribute,
                     "value": t.value, "precision": t.precision, "recall": t.recall, "F1": t.f1, "AUROC": t.auroc,
                     "support": t.support, "causal effect": t.causal_effect, "causal check": t.causal_status or "",
                     "entities": ents})
    return pd.DataFrame(rows)
