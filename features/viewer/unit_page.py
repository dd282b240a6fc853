"""A feature's or neuron's page: its figures, top and interval examples, histogram, logits, tags, monosemanticity,
related units and downloads. Built from a few large HTML blocks rather than many widgets: this is the page people
flip through, and each widget costs the browser more than the same content as HTML.
"""

from __future__ import annotations

import html
import json
import math

import streamlit as st

from features.store import FeatureStore, Unit
from features.viewer import listing
from features.viewer.markup import (
    best_tag,
    concept_chip,
    example_html,
    fmt,
    histogram_html,
    logits_html,
    metrics_html,
    related_html,
    tags_html,
)
from features.viewer.nav import done, goto, unit_href, unit_index
from features.viewer.sources import Sources, label_hint, open_sae
from sae.errors import SaekitError
from sae.hooks import sae_hooks


def render(store: FeatureStore, src: Sources, kind: str) -> None:
    """The unit `?id=` names; a bad id falls back to the list with a message saying why."""
    idx, problem = unit_index(store, kind)
    if idx is None:
        listing.render(store, src, notice=problem)
        return
    try:
        u = store.unit(kind, idx)
    except SaekitError as exc:
        listing.render(store, src, notice=str(exc))
        return
    st.session_state[f"_last_{kind}"] = idx
    _header(store, u)
    hint = html.escape(label_hint(src).replace("`", ""))
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.html(_examples_html(u))
    with right:
        st.html(_facts_html(u, hint))
        _downloads(store, src, u)
    _related(store, u)
    done(f"{kind}-{idx}")


def _header(store: FeatureStore, u: Unit) -> None:
    """Title with prev/next/compare buttons, a one-line summary and the unit's figures."""
    kind, idx = u.kind, u.index
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
        line.append(f"{u.semantics.cls} (score {fmt(u.semantics.score, '.2f')})")
    if u.tags:
        line.append(f"best tag <b>{html.escape(best_tag(u.tags))}</b>")
    if u.explanation:
        line.append(f"“{html.escape(u.explanation)}”")
    st.html(f'<div class="sk-line">{" · ".join(line)}</div>' + metrics_html([
        ("firing frequency", f"{u.freq:.3%}", "share of the analysed tokens on which it is > 0"),
        ("firings", f"{u.n_fires:,}", "analysed tokens on which it is > 0"),
        ("max activation", f"{u.max_act:.3g}", "largest activation on the analysed tokens"),
        ("mean activation", f"{u.mean_act:.3g}", "mean over the tokens where it fires"),
        ("monosemanticity", fmt(u.semantics.score if u.semantics else None, ".2f"),
         "from the labeler (saekit label)")]))


def _examples_html(u: Unit) -> str:
    """Top activations, then uniform samples from each activation interval."""
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
    return "".join(parts)


def _facts_html(u: Unit, hint: str) -> str:
    """Histogram, output logits, tags and monosemanticity (with how to fill what is missing)."""
    parts = ['<div class="sk-h">Activation histogram</div>', histogram_html(u.hist_edges, u.hist_counts)]
    if u.pos_logits or u.neg_logits:
        parts.append('<div class="sk-h">Output logits</div><div class="sk-cols2">'
                     f'<div>{logits_html("promoted", u.pos_logits, "#2f9e44")}</div>'
                     f'<div>{logits_html("suppressed", u.neg_logits, "#c92a2a")}</div></div>')
    parts.append('<div class="sk-h">Tags</div>')
    parts.append(tags_html(u.tags) if u.tags else f'<div class="sk-hint">No tags for this {u.kind}; {hint}.</div>')
    parts.append('<div class="sk-h">Monosemanticity</div>')
    if u.semantics is not None:
        parts.append(f"<div><b>{html.escape(u.semantics.cls)}</b>, score {fmt(u.semantics.score, '.3f')}"
                     + (" · concepts found:" if u.semantics.concepts else "") + "</div>")
        parts += [concept_chip(c) for c in u.semantics.concepts]
    else:
        parts.append(f'<div class="sk-hint">Not scored yet; {hint}.</div>')
    return "".join(parts)


def _related(store: FeatureStore, u: Unit) -> None:
    """Nearest, co-firing, correlated and (features) aligned units, each a link to its page."""
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
    payload = {"sae_id": m.get("sae_id"), "hook_name": sae_hooks(sae)[1], "feature": u.index, "d": len(vec),
               "norm": math.sqrt(sum(x * x for x in vec)), "decoder": vec}
    c[0].download_button("Decoder vector (JSON)", lambda: json.dumps(payload),
                         file_name=f"feature-{u.index}-decoder.json", mime="application/json", key="u_dec_dl",
                         width="stretch")
    st.caption(f"{len(vec)} weights, norm {payload['norm']:.4f}, written at `{payload['hook_name']}`. The JSON "
               "holds the vector under `decoder`.")
