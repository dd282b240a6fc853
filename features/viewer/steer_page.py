"""The steering page: greedy continuations of a prompt without and with a feature's decoder direction added at the
hook the SAE writes to, side by side.
"""

from __future__ import annotations

import html

import streamlit as st

from features.store import FeatureStore
from features.viewer.live_page import live_model
from features.viewer.markup import short_tokens
from features.viewer.nav import done, unit_index
from features.viewer.sources import Sources


def render(store: FeatureStore, src: Sources) -> None:
    """Greedy continuations of a prompt without and with a feature's direction added at every position."""
    st.title("Steering")
    live = live_model(store, src)
    if live is None:
        done("steer")
        return
    n = store.n_units("feature")
    idx, _ = unit_index(store, "feature")
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
        st.session_state["_steer"] = (int(feature), mult, prompt, live.generate(prompt, n_tok),
                                      live.generate(prompt, n_tok, int(feature), mult * scale))
    res = st.session_state.get("_steer")
    if res:
        fid, m, p, plain, steered = res
        c = st.columns(2)
        c[0].markdown("**Without steering**")
        c[0].html(f'<div class="sk-ex"><b>{html.escape(p)}</b>{html.escape(plain)}</div>')
        c[1].markdown(f"**With feature {fid} × {m:g}**")
        c[1].html(f'<div class="sk-ex"><b>{html.escape(p)}</b>{html.escape(steered)}</div>')
    done("steer")
