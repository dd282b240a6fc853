"""HTML pieces of the feature browser: highlighted token text, link tables, a histogram and small tables, and the
number and tag formats the pages share. Plain functions returning strings, so they are cheap to test and the
pages stay readable.

The feature page is the viewer's hot path, so it is built from this HTML (one `st.html` each) rather than from
chart and grid widgets, which each load a large script bundle in the browser. `st.html` sanitises its input
(no scripts, no SVG) and keeps `style`, `title` and links; a link without a target opens in the same tab.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

from features.store import Example, Tag, UnitSummary

CSS = """<style>
.sk-ex {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.86rem; line-height: 1.8;
        white-space: pre-wrap; word-break: break-word; margin: 0 0 3px 0; padding: 1px 4px; border-radius: 4px;}
.sk-ex:hover {background: rgba(127,127,127,0.08);}
.sk-v {display: inline-block; min-width: 3.4em; color: #888; font-size: 0.76rem; text-align: right;
       margin-right: 0.7em; user-select: none;}
.sk-t {border-radius: 3px; padding: 1px 0;}
.sk-f {outline: 1.5px solid #d9480f;}
.sk-nl {color: #aaa;}
.sk-iv {margin: 12px 0 4px 0; font-size: 0.84rem; color: #555;}
.sk-bar {display: inline-block; height: 0.6em; background: #f08c00; border-radius: 2px; margin-left: 8px;}
.sk-rel {font-size: 0.85rem; border-collapse: collapse; width: 100%; margin-bottom: 10px;}
.sk-rel td, .sk-rel th {padding: 2px 8px 2px 0; vertical-align: top; border: none; text-align: left;}
.sk-rel th {color: #888; font-weight: 500; font-size: 0.76rem;}
.sk-rel td.n, .sk-rel th.n {text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums;}
.sk-rel td.tok {color: #555; font-family: ui-monospace, monospace; font-size: 0.8rem;}
.sk-grid .sk-rel td.tok {white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: 0; width: 100%;}
.sk-rel a {text-decoration: none; font-weight: 600;}
.sk-rel tr.sk-r:hover {background: rgba(127,127,127,0.07);}
.sk-mono {font-family: ui-monospace, monospace; font-size: 0.82rem;}
.sk-chip {display: inline-block; border-radius: 10px; padding: 0 8px; margin: 0 4px 4px 0; font-size: 0.8rem;
          background: #e7f0ff; color: #1c5bc9;}
.sk-legend {font-size: 0.78rem; color: #777; margin: 2px 0 4px 0;}
.sk-hist {position: relative; height: 130px; border-bottom: 1px solid #bbb; margin: 4px 0 0 2.6em;}
.sk-hb {position: absolute; bottom: 0; background: #f08c00; border-radius: 2px 2px 0 0; min-height: 1px;}
.sk-hb:hover {background: #d9480f;}
.sk-hy {position: absolute; left: -2.8em; font-size: 0.7rem; color: #888; width: 2.5em; text-align: right;}
.sk-hx {position: relative; height: 1.3em; margin-left: 2.6em; font-size: 0.7rem; color: #888;}
.sk-hx span {position: absolute; transform: translateX(-50%);}
.sk-h {font-size: 1.45rem; font-weight: 600; margin: 1.1rem 0 0.5rem 0; line-height: 1.3;}
.sk-h:first-child {margin-top: 0.2rem;}
.sk-note {font-size: 0.85rem; color: #808495; margin: 6px 0 4px 0;}
.sk-hint {background: rgba(28,131,225,0.1); color: #0b4f8a; border-radius: 8px; padding: 12px 16px;
          font-size: 0.92rem;}
.sk-scroll {max-height: 560px; overflow-y: auto; border: 1px solid rgba(49,51,63,0.15); border-radius: 8px;
            padding: 4px 10px;}
.sk-cols2 {display: grid; grid-template-columns: 1fr 1fr; gap: 1.2rem;}
.sk-grid {display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 1.4rem;}
.sk-line {margin: 0 0 4px 0;}
.sk-line code {font-size: 0.85rem; background: rgba(127,127,127,0.1); padding: 1px 5px; border-radius: 4px;}
.sk-ms {display: flex; gap: 2.5rem; flex-wrap: wrap; margin: 6px 0 14px 0;}
.sk-ml {font-size: 0.82rem; color: #666;}
.sk-mv {font-size: 1.9rem; line-height: 1.2;}
</style>"""


def token_text(text: str) -> str:
    """A token as visible HTML: newlines and tabs shown as symbols so an example stays one paragraph."""
    out = html.escape(text).replace("\n", '<span class="sk-nl">⏎</span>').replace("\t", '<span class="sk-nl">⇥</span>')
    return out or '<span class="sk-nl">∅</span>'


def background(value: float, scale: float) -> str:
    """Orange in proportion to a positive value, blue to a negative one (neurons can be negative)."""
    if not value or not scale or not math.isfinite(value):
        return ""
    a = min(abs(value) / scale, 1.0) * 0.85
    colour = "255,120,0" if value > 0 else "40,110,255"
    return f"background: rgba({colour},{a:.2f});"


def tokens_html(tokens: Sequence[str], values: Sequence[float], scale: float, focus: int | None = None,
                titles: Sequence[str] | None = None, label: str | None = None) -> str:
    """One line of text, each token's background in proportion to its value, the value in its hover title.
    A token's leading spaces stay outside the coloured box, so a line wraps between words, not inside a box.
    Tokens where the unit is silent are plain text: a sparse feature's page then stays a small document."""
    parts = [f'<span class="sk-v">{html.escape(label)}</span>'] if label is not None else []
    for i, (t, v) in enumerate(zip(tokens, values, strict=True)):
        body = t.lstrip(" ") or t
        lead = t[:len(t) - len(body)]
        title = titles[i] if titles is not None else (f"{t!r}: {v:.3g}" if v else None)
        if title is None and i != focus:
            parts.append(lead + token_text(body))
            continue
        cls = "sk-t sk-f" if i == focus else "sk-t"
        style = background(v, scale)
        style_attr = f' style="{style}"' if style else ""
        title = html.escape(title or f"{t!r}: 0", quote=True)
        parts.append(f'{lead}<span class="{cls}"{style_attr} title="{title}">{token_text(body)}</span>')
    return '<div class="sk-ex">' + "".join(parts) + "</div>"


def metrics_html(items: Sequence[tuple[str, str, str]]) -> str:
    """A row of (label, value, help) figures; lighter in the browser than one metric widget each."""
    cells = "".join(f'<div class="sk-m" title="{html.escape(h, quote=True)}"><div class="sk-ml">{html.escape(label)}'
                    f'</div><div class="sk-mv">{html.escape(value)}</div></div>' for label, value, h in items)
    return f'<div class="sk-ms">{cells}</div>'


def example_html(e: Example, scale: float) -> str:
    """A stored example: its window of tokens, the example token outlined, its value on the left."""
    return tokens_html(e.tokens, e.acts, scale, e.focus, label=f"{e.value:.3g}")


def short_tokens(tokens: Sequence[str], n: int = 4) -> str:
    """A few tokens, trimmed and separated by a dot so punctuation tokens stay readable."""
    return " · ".join(repr(t)[1:-1].strip() or "␣" for t in tokens[:n])


def related_html(kind: str, pairs: Sequence[tuple[int, float]], summaries: dict[int, UnitSummary],
                 href: Callable[[str, int], str], value_name: str) -> str:
    """Related units as rows of link · value · top tokens."""
    if not pairs:
        return '<div class="sk-legend">none recorded</div>'
    rows = [f'<tr><th>{kind}</th><th class="n">{html.escape(value_name)}</th><th>top tokens</th></tr>']
    for i, v in pairs:
        s = summaries.get(i)
        toks = html.escape(short_tokens(s.top_tokens, 5)) if s else ""
        rows.append(f'<tr class="sk-r"><td><a href="{href(kind, i)}">{kind[0].upper()}{i}</a></td>'
                    f'<td class="n">{v:.3f}</td><td class="tok">{toks}</td></tr>')
    return '<table class="sk-rel">' + "".join(rows) + "</table>"


def _tick(x: float) -> str:
    return f"{x:.0e}".replace("e+00", "").replace("e-0", "e-").replace("e+0", "e") if x < 0.01 or x >= 1000 \
        else f"{x:g}"


def histogram_html(edges: Sequence[float], counts: Sequence[int]) -> str:
    """The log-binned activation histogram as positioned bars; each bar's title gives its range, count,
    share of firings and density (share per unit of activation)."""
    total = sum(counts) or 1
    bins = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        lo_ = lo if lo > 0 else (hi / 10 ** 0.1 if math.isfinite(hi) else 1e-4)
        hi_ = hi if math.isfinite(hi) else lo_ * 10 ** 0.1
        bins.append((lo_, hi_, c))
    if not bins:
        return '<div class="sk-legend">no firings</div>'
    x0, x1 = math.log10(bins[0][0]), math.log10(bins[-1][1])
    span = (x1 - x0) or 1.0
    top = max(c for _, _, c in bins) / total or 1.0
    bars = []
    for lo, hi, c in bins:
        if not c:
            continue
        left = (math.log10(lo) - x0) / span * 100
        width = max((math.log10(hi) - math.log10(lo)) / span * 100 - 0.4, 0.3)
        share = c / total
        title = (f"[{lo:.3g}, {hi:.3g}): {c:,} firings, {share:.2%} of all; density {share / (hi - lo):.3g} per unit "
                 "activation")
        bars.append(f'<div class="sk-hb" style="left:{left:.2f}%;width:{width:.2f}%;height:{share / top * 100:.1f}%" '
                    f'title="{title}"></div>')
    axis = '<span class="sk-hy" style="top:-0.5em">' + f"{top:.0%}</span>" + \
        '<span class="sk-hy" style="bottom:-0.5em">0%</span>'
    ticks = []
    for d in range(math.floor(x0), math.ceil(x1) + 1):
        for m in (1, 2, 5):
            x = math.log10(m) + d
            if x0 <= x <= x1:
                ticks.append(f'<span style="left:{(x - x0) / span * 100:.1f}%">{_tick(m * 10.0 ** d)}</span>')
    return (f'<div class="sk-hist">{axis}{"".join(bars)}</div><div class="sk-hx">{"".join(ticks)}</div>'
            '<div class="sk-legend" style="text-align:center">activation (log scale); bar height: share of firings'
            "</div>")


def fmt(v: object, spec: str = ".3f") -> str:
    """A figure, or a dash where there is none (None, NaN, inf) so tables never show "nan"."""
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def best_tag(tags: Sequence[Tag]) -> str:
    """The first (best) tag of a unit as one line, e.g. `country.continent=Europe (F1 0.72)`."""
    if not tags:
        return ""
    t = tags[0]
    return f"{t.entity_type}.{t.attribute}={t.value}" + (f" (F1 {t.f1:.2f})" if t.f1 is not None else "")


def tags_html(tags: Sequence[Tag]) -> str:
    """The labeler's tags of one unit: scores on one line, the entities behind the tag on the next (all of them
    on hover)."""
    head = ("<tr><th>tag</th><th class='n'>prec.</th><th class='n'>recall</th><th class='n'>F1</th>"
            "<th class='n'>AUROC</th><th class='n'>causal effect</th></tr>")
    rows = []
    for t in tags:
        ents = [str(e) for e in t.entities]
        shown = ", ".join(ents[:8]) + (f" … +{len(ents) - 8} more" if len(ents) > 8 else "")
        causal = fmt(t.causal_effect, "+.3f") + (f" ({t.causal_status})" if t.causal_status else "")
        rows.append(f'<tr class="sk-r"><td><b>{html.escape(t.entity_type)}.{html.escape(t.attribute)}</b> = '
                    f"{html.escape(t.value)}</td><td class='n'>{fmt(t.precision)}</td><td class='n'>{fmt(t.recall)}"
                    f"</td><td class='n'>{fmt(t.f1)}</td><td class='n'>{fmt(t.auroc)}</td>"
                    f"<td class='n'>{html.escape(causal)}</td></tr>")
        if ents:
            rows.append(f'<tr><td colspan="6" class="tok" title="{html.escape(", ".join(ents), quote=True)}">'
                        f"entities ({t.support if t.support is not None else len(ents)}): {html.escape(shown)}"
                        "</td></tr>")
    return f'<table class="sk-rel">{head}{"".join(rows)}</table>'


def concept_chip(c: object) -> str:
    """One concept the labeler found, e.g. {"concept": "country.continent=Europe", "p": 0.8, ...}: its name and
    p on the chip, every other field on hover."""
    if isinstance(c, dict) and "concept" in c:
        rest = " · ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                          if k != "concept")
        p = c.get("p")
        label = str(c["concept"]) + (f" · p {p:.2f}" if isinstance(p, float) else "")
        return f'<span class="sk-chip" title="{html.escape(rest, quote=True)}">{html.escape(label)}</span>'
    text = " · ".join(map(str, c)) if isinstance(c, list | tuple) else str(c)
    return f'<span class="sk-chip">{html.escape(text)}</span>'


def logits_html(title: str, pairs: Sequence[tuple[str, float]], colour: str) -> str:
    rows = "".join(f'<tr><td class="sk-mono">{token_text(t)}</td><td class="n" style="color:{colour}">{v:+.3f}</td>'
                   "</tr>" for t, v in pairs)
    return f'<div class="sk-legend">{html.escape(title)}</div><table class="sk-rel">{rows}</table>'
