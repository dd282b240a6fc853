"""The run-level report of the attribute directions across the early MLP layers: `label.json` (headline per kind,
per-attribute rows, layers, settings), `label.md` (tables and what held, in plain words) and
`label-directions.png` (cause / upper bound per attribute and kind, with 95% intervals), written atomically into the
folder the caller names (`RunLayout.run_report`).

Like `features.report`, it reads only the labeler's results, so how findings are presented never feeds back into how
they are measured."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from features.labeling.directions import DIR_KINDS, DirectionsResult
from features.labeling.directions_stats import HOLD_FRACTION, QUALIFY, summarize
from sae.io import atomic_write_bytes, atomic_write_text

FILES = {"json": "label.json", "markdown": "label.md", "plot": "label-directions.png"}
COLORS = {"feature": "tab:blue", "neuron": "tab:orange", "baseline": "tab:gray"}
NAMES = {"feature": "features", "neuron": "neurons", "baseline": "baseline"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _interval(x: float | None, ci: list[float | None], pct: bool = True) -> str:
    if x is None:
        return "–"
    fmt = _pct if pct else (lambda v: "–" if v is None else f"{v:.2f}")
    return f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _p(x: float | None) -> str:
    return "–" if x is None else (f"{x:.1e}" if x < 1e-3 else f"{x:.3f}")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _headline_table(data: dict[str, Any]) -> str:
    rows = []
    for kind in DIR_KINDS:
        h = data["headline"][kind]
        rows.append([NAMES[kind], f"{h['attributes_causal']} of {data['qualified']}",
                     _interval(h["cause_fraction"], h["cause_fraction_ci"], pct=False),
                     _interval(h["disentanglement"], h["disentanglement_ci"], pct=False),
                     _interval(h["monosemantic_share"], h["monosemantic_share_ci"])])
    return _table(["kind", "directions that hold (qualifying attributes)", "cause / upper bound",
                   "disentanglement", "monosemantic share"], rows)


def _kind_table(rows: list[dict[str, Any]], kind: str) -> str:
    out = []
    for r in rows:
        c = r["kinds"][kind]
        out.append([r["attribute"] + ("" if r["qualifies"] else " (does not qualify)"),
                    _interval(c["cause"], c["cause_ci"]), _interval(r["upper_bound"], r["upper_bound_ci"]),
                    "–" if c["fraction"] is None else f"{c['fraction']:.2f}", _pct(c["random_cause"]),
                    _p(c["p"]), _p(c["p_holm"]), _interval(c["isolation"], c["isolation_ci"]),
                    "yes" if c["holds"] else "no", sum(c["units_per_layer"]),
                    "–" if c.get("units_moved") is None else f"{c['units_moved']:.1f}"]
                   + ([_interval(r.get("all_features_fraction"), r.get("all_features_fraction_ci") or [None, None],
                                 pct=False)] if kind == "feature" else []))
    return _table(["attribute", "cause [95% CI]", "upper bound", "fraction", "random groups", "p", "Holm p",
                   "isolation", "holds", "units", "units moved per pair"]
                  + (["all features / upper bound"] if kind == "feature" else []), out)


def _words(data: dict[str, Any]) -> str:
    """What held and what did not, in plain words."""
    scored = [r for r in data["attributes"] if not r["skipped"]]
    qual = [r for r in scored if r["qualifies"]]
    target = data["target"]
    lines = [f"{len(qual)} of {len(scored)} scored attributes qualified (upper bound >= {QUALIFY:.0%}); the target "
             f"is a holding feature direction for {target['attributes_needed']} of them."]
    for kind in DIR_KINDS:
        held = [r["attribute"] for r in qual if r["kinds"][kind]["holds"]]
        missed = [r["attribute"] for r in qual if not r["kinds"][kind]["holds"]]
        lines.append(f"{NAMES[kind].capitalize()}: held for {len(held)} ({', '.join(held) or 'none'}); did not hold "
                     f"for {len(missed)} ({', '.join(missed) or 'none'}).")
    if not qual:
        lines.append("No attribute qualified, so the causal-directions target cannot be assessed.")
    else:
        lines.append(f"The causal-directions target is {'met' if target['feature_directions_met'] else 'not met'}.")
    fmn = data["features_minus_neurons"]
    if fmn["cause_fraction_diff"] is None:
        lines.append("Features vs neurons: no qualifying attribute, so no comparison.")
    else:
        beat = ("features beat neurons (the interval excludes 0)" if target["features_beat_neurons"] else
                "features do not beat neurons (the interval includes or lies below 0)")
        lines.append(f"Features minus neurons, cause / upper bound: {fmn['cause_fraction_diff']:+.2f} "
                     f"[{fmn['ci'][0]:+.2f}, {fmn['ci'][1]:+.2f}]: {beat}.")
    return " ".join(lines)


def _ceiling(data: dict[str, Any]) -> str:
    """The SAEs' own ceiling: every feature interchanged, against the upper bound."""
    a = data.get("all_features") or {}
    if a.get("fraction") is None:
        return ""
    return (f"\nEvery feature of every SAE interchanged at once reaches {_interval(a['fraction'], a['ci'], pct=False)} "
            "of the upper bound: the most any group of features can carry here, because each SAE's reconstruction "
            "error stays the base entity's.")


def render_markdown(data: dict[str, Any]) -> str:
    """`label.md`: the headline, the plain-words verdict, one table per kind, the skipped attributes."""
    s = data["settings"]
    d = s["directions"]
    layers = ", ".join(str(x["layer"]) for x in data["layers"])
    parts = ["# Attribute directions across the early MLP layers", "",
             f"Interchange at the entity's last token in layers {layers} at once, on held-out (base, source) pairs "
             f"({d['pairs']} per attribute at most); at most {d['units_per_layer']} units per layer, chosen per "
             f"attribute on training entities ({s['unit_rule']}); controls: size-matched random groups drawn afresh "
             f"for every pair "
             f"({d['random_groups']} per pair and kind); baseline: {d['baseline']}. A direction holds when its cause "
             f"reaches {HOLD_FRACTION:.0%} of the upper bound and beats random groups after Holm correction. "
             "*Units moved per pair*: how many of the chosen units differ between source and base at all (an "
             "interchange can change nothing else).", "",
             _headline_table(data), "", _words(data), _ceiling(data), ""]
    scored = [r for r in data["attributes"] if not r["skipped"]]
    for kind in DIR_KINDS:
        parts += [f"## {NAMES[kind].capitalize()}", "", _kind_table(scored, kind) if scored else "Nothing scored.", ""]
    skipped = [r for r in data["attributes"] if r["skipped"]]
    if skipped:
        parts += ["## Skipped attributes", ""] + [f"- {r['attribute']}: {r['skipped']}" for r in skipped] + [""]
    timings = s.get("timings", {})
    parts.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".")
    return "\n".join(parts) + "\n"


def _whisker(value: float, end: float | None, side: int) -> float:
    """Length of an error bar from the bar's top to an interval end (0 when unknown)."""
    return 0.0 if end is None or math.isnan(value) else max(side * (end - value), 0.0)


def plot_directions(data: dict[str, Any]) -> bytes | None:
    """Bars of cause / upper bound per attribute and kind with 95% whiskers; None when nothing was scored."""
    rows = [r for r in data["attributes"] if not r["skipped"]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.8))
    width = 0.8 / len(DIR_KINDS)
    for j, kind in enumerate(DIR_KINDS):
        cells = [r["kinds"][kind] for r in rows]
        vals = [math.nan if c["fraction"] is None else c["fraction"] for c in cells]
        lo = [_whisker(v, c["fraction_ci"][0], -1) for v, c in zip(vals, cells, strict=True)]
        hi = [_whisker(v, c["fraction_ci"][1], 1) for v, c in zip(vals, cells, strict=True)]
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, color=COLORS[kind], label=NAMES[kind])
    ax.axhline(HOLD_FRACTION, color="black", lw=0.8, ls="--", label=f"holds at {HOLD_FRACTION:.0%}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["attribute"] + ("" if r["qualifies"] else "*") for r in rows], rotation=40, ha="right")
    ax.set_ylabel("cause / upper bound")
    ax.set_title("Interchanged units vs the whole MLP outputs (* = upper bound below "
                 f"{QUALIFY:.0%}, does not qualify)", fontsize=9)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_run_report(folder: str | Path, result: DirectionsResult,
                     monosemantic: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write `label.json`, `label.md` and the plot into `folder`; returns what was written by role.
    `monosemantic`: optional kind -> (share, [lo, hi]) for the headline (null when not given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = summarize(result, monosemantic)
    written = {"json": folder / FILES["json"], "markdown": folder / FILES["markdown"]}
    atomic_write_text(written["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write_text(written["markdown"], render_markdown(data))
    png = plot_directions(data)
    (folder / FILES["plot"]).unlink(missing_ok=True)  # never leave a stale plot beside new numbers
    if png is not None:
        written["plot"] = folder / FILES["plot"]
        atomic_write_bytes(written["plot"], png)
    return written
