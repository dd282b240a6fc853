"""The live text page: which features fire on typed text, token by token. It and the steering page need the
model; without a loadable one they say why and how to turn it on (the browsing pages never need it).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from features.store import FeatureStore, UnitSummary
from features.viewer.live import MAX_LIVE_TOKENS, LiveModel, LiveText
from features.viewer.markup import short_tokens, tokens_html
from features.viewer.nav import done, goto, unit_href
from features.viewer.sources import Sources, model_name, open_live

EXAMPLE_TEXT = ("The Eiffel Tower is in Paris, the capital of France. Tokyo is the capital of Japan, where people "
                "speak Japanese.")


def live_model(store: FeatureStore, src: Sources) -> LiveModel | None:
    """The cached live model, or None after a warning saying why live text is off and how to turn it on."""
    live, reason = open_live(str(src.sae_dir) if src.sae_dir else None, model_name(src, store), src.device)
    if live is None:
        st.warning(f"Live text is off: {reason or 'unknown reason'}")
        st.caption("The browsing pages do not need the model. To turn live text on, start the viewer with "
                   "`--model <name or local HF directory>` naming the model the SAE was trained on"
                   + ("" if src.sae_dir else " and `--sae <SAE directory>`") + ".")
    return live


def render(store: FeatureStore, src: Sources) -> None:
    st.title("Live text")
    st.caption(f"Runs the model up to `{store.meta['analysis']['sae_hook']}` and the SAE on your text. At most "
               f"{MAX_LIVE_TOKENS} tokens; longer input is cut.")
    live = live_model(store, src)
    if live is None:
        done("live")
        return
    res = _run_text(live, src)
    if res.cut:
        st.info(f"The text was cut to its first {MAX_LIVE_TOKENS} tokens ({res.cut:,} more were left out).")
    if not res.tokens:
        st.info("No tokens to show.")
        done("live")
        return
    best = [max((v for f, v in res.top(t, 1)), default=0.0) for t in range(len(res.tokens))]
    titles = [f"{t!r}: " + (", ".join(f"#{f} {v:.2f}" for f, v in res.top(i, 5)) or "no feature fires")
              for i, t in enumerate(res.tokens)]
    st.subheader("Strongest feature per token")
    st.html(tokens_html(res.tokens, best, max(best) or 1.0, titles=titles))
    st.caption("Background: the strongest feature's activation at each token; hover for the top features there.")
    strongest = res.strongest(30)
    summaries = store.summaries("feature", [f for f, _, _ in strongest])
    st.subheader("Features on this text")
    left, right = st.columns([3, 2], gap="large")
    with left:
        _features_table(res, strongest, summaries)
    with right:
        _one_feature(res, strongest, summaries)
    done("live")


def _run_text(live: LiveModel, src: Sources) -> LiveText:
    """The text form; the result is kept in the session (the example text runs on the first visit)."""
    with st.form("live_form", border=False):
        text = st.text_area("Text", value=st.session_state.get("_live_text", EXAMPLE_TEXT), height=110,
                            key="live_text_input")
        run = st.form_submit_button("Run", type="primary")
    stale = st.session_state.get("_live_sae") != str(src.sae_dir)
    if run or stale or "_live" not in st.session_state:
        st.session_state["_live_text"], st.session_state["_live_sae"] = text, str(src.sae_dir)
        st.session_state["_live"] = live.run(text)
    return st.session_state["_live"]


def _features_table(res: LiveText, strongest: list[tuple[int, float, int]],
                    summaries: dict[int, UnitSummary]) -> None:
    """The features firing on the text, strongest first; selecting one opens its page."""
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


def _one_feature(res: LiveText, strongest: list[tuple[int, float, int]], summaries: dict[int, UnitSummary]) -> None:
    """One chosen feature's activation across the text, and the per-token table."""
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
