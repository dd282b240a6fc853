"""The compare page: one unit beside the units of the other kind that explain it (a neuron beside the features it
splits into, a feature beside the neurons it is spread over), so polysemanticity is shown, not asserted.
"""

from __future__ import annotations

import html

import streamlit as st

from features.store import FeatureStore, Unit
from features.viewer.markup import best_tag, example_html, short_tokens
from features.viewer.nav import done, goto, qp, unit_href, unit_index


def render(store: FeatureStore) -> None:
    kind = qp("kind", "neuron")
    kind = kind if kind in ("feature", "neuron") else "neuron"
    other = "neuron" if kind == "feature" else "feature"
    if not store.n_units(other) or not store.n_units(kind):
        st.title("Compare")
        st.info("Comparing needs both features and neurons in the store; this one was analysed without neurons "
                "(analyze.neurons: false).")
        done("compare")
        return
    idx, problem = unit_index(store, kind)
    idx = idx if idx is not None else 0
    st.title(f"{kind.capitalize()} {idx} beside the {other}s " +
             ("that explain it" if kind == "neuron" else "it is spread over"))
    _picker(store, kind, idx)
    if problem:
        st.warning(problem)
    u = store.unit(kind, idx)
    st.caption(f"Right: the {other}s whose activations correlate most with this {kind} over the analysed tokens "
               f"(Pearson r){' and those aligned with its decoder direction' if kind == 'feature' else ''}. "
               "If the left column mixes unrelated contexts and each right-hand unit takes one of them, the "
               f"{kind} is polysemantic and the {other}s split it.")
    left, right = st.columns([1, 1], gap="large")
    with left:
        unit_card(u, n_examples=12)
    with right:
        _explaining_units(store, u, other)
    done(f"compare-{kind}-{idx}")


def _picker(store: FeatureStore, kind: str, idx: int) -> None:
    """Which unit to compare: changing kind or id switches the page's URL."""
    c = st.columns([1.2, 1.2, 5])
    picked = c[0].selectbox("Unit", ["neuron", "feature"], index=["neuron", "feature"].index(kind),
                            key=f"cmp_kind_{kind}_{idx}")
    new = c[1].number_input("id", min_value=0, max_value=store.n_units(kind) - 1, value=int(idx), step=1,
                            key=f"cmp_id_{kind}_{idx}")
    if picked != kind:
        goto("compare", kind=picked, id=0)
    if new != idx:
        goto("compare", kind=kind, id=int(new))


def _explaining_units(store: FeatureStore, u: Unit, other: str) -> None:
    """The six most correlated (or, for a feature, decoder-aligned) units of the other kind, as cards."""
    spread = dict(u.correlated)
    if u.kind == "feature":
        for i, _ in u.aligned:
            spread.setdefault(i, 0.0)
    for i, r in sorted(spread.items(), key=lambda kv: -abs(kv[1]))[:6]:
        v = store.unit(other, i)
        with st.container(border=True):
            unit_card(v, n_examples=3, note=f"r = {r:+.3f}" if r else "aligned (decoder · W_out)")
    if not spread:
        st.info(f"No correlated {other}s were recorded for this {u.kind}.")


def unit_card(u: Unit, n_examples: int, note: str | None = None) -> None:
    """A unit in brief: a link to its page, its figures, best tags, top tokens and a few examples."""
    cls = f" · {u.semantics.cls}" if u.semantics else ""
    head = (f'<a href="{unit_href(u.kind, u.index)}"><b>{u.kind.capitalize()} {u.index}</b></a>'
            f'<span class="sk-legend"> · {html.escape(note) + " · " if note else ""}freq {u.freq:.2%} · max '
            f"{u.max_act:.3g}{cls}</span>")
    chips = ""
    if u.tags:
        chips = "<div>" + "".join(f'<span class="sk-chip">{html.escape(best_tag([t]))}</span>' for t in u.tags[:4]) \
            + "</div>"
    toks = f'<div class="sk-legend">top tokens: {html.escape(short_tokens(u.top_tokens, 8))}</div>'
    st.html(f"<div>{head}</div>{chips}{toks}" + "".join(example_html(e, u.max_act)
                                                        for e in u.top_examples[:n_examples]))
