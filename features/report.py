"""The labeler's report: `label.md` (headline table, knowledge filter, probes, tags, causal checks, skipped
attributes, monosemanticity), `label.json` (the same numbers, machine-readable) and PNG plots, all written
atomically into one folder the caller names. Every headline figure carries its 95% bootstrap interval: over units
for the monosemantic share, over entities for tag counts, over held-out entities for probe accuracies (means over
attributes resample each attribute's entities on their own).

It sits above `features.labeling` and reads only the labeler's results, so labeling never depends on how its
findings are presented."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from features.labeling import AttributeReport, CausalResult, LabelOutcome, LabelResult
from features.labeling.significance import Interval, paired_bootstrap_ci
from features.store import KINDS, Kind, Tag
from sae.io import atomic_write_bytes, atomic_write_text

PLOTS = {"semantics": "label-semantics.png", "probes": "label-probes.png", "causal": "label-causal.png",
         "knowledge": "label-knowledge.png"}


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ci(ci: list[float] | None, fmt: Any = _pct) -> str:
    """" [lo, hi]" in the value's format, or "" without an interval."""
    if not ci or any(x is None or math.isnan(x) for x in ci):
        return ""
    return f" [{fmt(ci[0]).rstrip('%')}, {fmt(ci[1])}]"


def _count(x: float) -> str:
    return f"{x:.0f}"


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def probe_table(result: LabelResult) -> dict[str, dict[str, Any]]:
    """attribute name -> {method key -> accuracy, baseline, n_train, n_test}; keys 'full', 'feature 1',
    'feature k', 'neuron 1', 'neuron k', each also with '<key> ci' and '<key> correct' (per held-out entity)."""
    out: dict[str, dict[str, Any]] = {}
    for p in result.probes:
        row = out.setdefault(f"{p.entity_type}.{p.attribute}", {"baseline": p.baseline, "n_train": p.n_train,
                                                                "n_test": p.n_test})
        key = "full" if p.method == "full" else f"{p.kind} {'1' if p.method == '1-sparse' else 'k'}"
        row[key] = p.accuracy
        row[f"{key} ci"] = p.details.get("accuracy_ci")
        row[f"{key} correct"] = p.details.get("test_correct")
    return out


def _mean_accuracy(probes: dict[str, dict[str, Any]], key: str) -> Interval:
    """The mean over attributes of one probe's held-out accuracy, with its 95% interval (each attribute's held-out
    entities resampled on their own)."""
    groups = [r[f"{key} correct"] for r in probes.values() if r.get(f"{key} correct")]
    return paired_bootstrap_ci(groups, lambda gs: float(sum(g.mean() for g in gs) / len(gs)))


def _kinds(result: LabelResult) -> list[Kind]:
    """The kinds the labeler scored: neurons only when their hook was labeled."""
    return list(KINDS) if result.settings.get("neuron_hook") else ["feature"]


def headline(result: LabelResult, semantics: dict[str, Any] | None,
             seeds: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """The numbers of the headline table, per kind, and under "full" the full probe and features vs neurons.
    The keys agreed for every label.json (`directions_stats.HEADLINE_KEYS`) are all present; cause fraction and
    disentanglement are run-level figures across layers (reports/run/label.json), null for one SAE."""
    probes = probe_table(result)
    scored = [a for a in result.attributes if not a.skipped]
    out: dict[str, dict[str, Any]] = {}
    for kind in _kinds(result):
        tags = [t for t in result.tags if t.kind == kind]
        tested = [c for c in result.causal if c.kind == kind and c.status != "not tested"]
        sem = (semantics or {}).get(kind) or {}
        p1, pk = _mean_accuracy(probes, f"{kind} 1"), _mean_accuracy(probes, f"{kind} k")
        causal_attrs = {(c.entity_type, c.attribute) for c in tested if c.status == "causal"}
        out[kind] = {
            "attributes_scored": len(scored), "attributes_causal": len(causal_attrs),
            "cause_fraction": None, "cause_fraction_ci": [None, None],
            "disentanglement": None, "disentanglement_ci": [None, None], "seeds": list(seeds or []),
            "mono_share": sem.get("mono_share"), "mono_share_ci": sem.get("mono_share_ci"),
            "monosemantic_share": sem.get("mono_share"), "monosemantic_share_ci": sem.get("mono_share_ci"),
            "mono_share_top": sem.get("mono_share_top"), "mean_score": sem.get("mean_score"),
            "attributes_tagged": sum(1 for a in scored if a.n_tags.get(kind, 0) > 0), "attributes": len(scored),
            "attributes_tagged_ci": result.cis.get("attributes_tagged", {}).get(kind),
            "tags": len(tags), "tags_ci": result.cis.get("tags", {}).get(kind),
            "causal": sum(c.status == "causal" for c in tested), "tested": len(tested),
            "probe_1": _mean([r.get(f"{kind} 1") for r in probes.values()]), "probe_1_ci": p1.as_list(),
            "probe_k": _mean([r.get(f"{kind} k") for r in probes.values()]), "probe_k_ci": pk.as_list(),
        }
    out["full"] = {"probe": _mean([r.get("full") for r in probes.values()]),
                   "probe_ci": _mean_accuracy(probes, "full").as_list(),
                   "baseline": _mean([r.get("baseline") for r in probes.values()])}
    if "neuron" in out:  # per attribute: do features beat neurons? (test sets are small; count, not just mean)
        for key in ("1", "k"):
            pairs = [(r.get(f"feature {key}"), r.get(f"neuron {key}")) for r in probes.values()]
            pairs = [(f, n) for f, n in pairs if f is not None and n is not None]
            out["full"][f"features_vs_neurons_{key}"] = [sum(f > n for f, n in pairs), sum(f == n for f, n in pairs),
                                                         sum(f < n for f, n in pairs)]
    return out


# ---------------------------------------------------------------------------------------------
# label.md, one function per section


def _md_intro(result: LabelResult, meta: dict[str, Any]) -> list[str]:
    s, cfg = result.settings, result.settings["label_config"]
    lines = [f"# Entity-attribute labels: {meta.get('sae_id', 'SAE')}", ""]
    lines.append(f"Model `{meta.get('model_name', '?')}`, SAE `{meta.get('sae_id', '?')}` on `{s['sae_hook']}` "
                 f"({s['n_features']:,} features)" + (f"; neurons: `{s['neuron_hook']}` ({s['n_neurons']:,})"
                                                      if s.get("neuron_hook") else "") + ".")
    where = "last token" if cfg["pooling"] == "last" else "tokens, max-pooled"
    on = ("above the unit's on threshold from the analysis pass (features > 0, neurons above a quantile matched "
          "to the features' median firing rate)" if cfg.get("feature_on") == "fires"
          else "above the unit's best-F1 threshold, features and neurons alike")
    lines.append(f"Entity activations at the entity's {where} of its context prompt; tags need F1 ≥ {cfg['min_f1']}, "
                 f"AUROC ≥ {cfg['min_auroc']} over ≥ {cfg['min_positives']} known entities (\"on\": {on}). "
                 f"Labeling took {result.timings.get('total', 0):.0f}s, {result.timings.get('forward', 0):.0f}s of "
                 "it in model forward passes.")
    return lines


def _md_headline(result: LabelResult, semantics: dict[str, Any] | None, plots: dict[str, str]) -> list[str]:
    s, cfg, kinds = result.settings, result.settings["label_config"], _kinds(result)
    h = headline(result, semantics)
    rows = []

    def row(name: str, fmt: Any) -> None:
        rows.append([name] + [fmt(h[k]) for k in kinds])

    if semantics:
        row("monosemantic share (whole activation range)", lambda d: _pct(d["mono_share"]) + _ci(d["mono_share_ci"]))
        row("monosemantic share (top examples only)", lambda d: _pct(d["mono_share_top"]))
        row("mean monosemanticity score", lambda d: _num(d["mean_score"]))
    row("attributes with ≥ 1 tag", lambda d: f"{d['attributes_tagged']} / {d['attributes']}"
        + _ci(d["attributes_tagged_ci"], _count))
    row("tags", lambda d: str(d["tags"]) + _ci(d["tags_ci"], _count))
    row("tags causal / tested", lambda d: f"{d['causal']} / {d['tested']}")
    row("mean 1-sparse probe accuracy", lambda d: _pct(d["probe_1"]) + _ci(d["probe_1_ci"]))
    row(f"mean {cfg['probe_k']}-sparse probe accuracy", lambda d: _pct(d["probe_k"]) + _ci(d["probe_k_ci"]))
    lines = ["", "## Headline", "", "95% bootstrap intervals in brackets: over units (monosemantic share), over "
             "entities, by value (tags: the bootstrap's spread placed around the count, since resamples cross the "
             "thresholds more often than the sample did; features/labeling/scoring.py), over held-out entities "
             "(probes).", "",
             _table(["", *[f"{k}s" for k in kinds]], rows)]
    lines += ["", f"Full linear probe on `{s['sae_hook']}` (all dimensions): mean accuracy "
                  f"{_pct(h['full']['probe'])}{_ci(h['full']['probe_ci'])}; majority-class baseline "
                  f"{_pct(h['full']['baseline'])}."]
    for key, name in (("1", "1-sparse"), ("k", f"{cfg['probe_k']}-sparse")):
        wins = h["full"].get(f"features_vs_neurons_{key}")
        if wins:
            lines.append(f"{name} probes, per attribute: features better on {wins[0]}, tied on {wins[1]}, "
                         f"worse on {wins[2]}.")
    lines.append("")
    if "semantics" in plots:
        lines += [f"![monosemanticity]({plots['semantics']})", ""]
    return lines


def _md_knowledge(result: LabelResult, plots: dict[str, str]) -> list[str]:
    cfg = result.settings["label_config"]
    lines = ["## Knowledge filter", "",
             f"An entity is kept for an attribute when the first token of its correct value has the highest "
             f"next-token log-probability among the attribute's values (mean over {cfg['templates']} "
             "template(s)).", ""]
    rows = []
    for a in result.attributes:
        if a.n_known is None:
            continue
        dropped = ", ".join(f"{v} ({n})" for v, n in a.dropped_values[:6]) + (" …" if len(a.dropped_values) > 6
                                                                               else "")
        rows.append([a.name, a.n_entities, a.n_known, _pct(a.kept_fraction), len(a.values), dropped,
                     "; ".join("/".join(c) for c in a.collisions[:4])])
    lines.append(_table(["attribute", "entities", "known", "kept", "values used", "values dropped (known)",
                         "first-token collisions"], rows))
    if "knowledge" in plots:
        lines += ["", f"![kept fraction]({plots['knowledge']})"]
    return lines


def _md_probes(result: LabelResult, plots: dict[str, str]) -> list[str]:
    s, cfg, kinds = result.settings, result.settings["label_config"], _kinds(result)
    lines = ["", "## Probes (held-out accuracy)", "",
             f"Deterministic stratified split ({_pct(cfg['test_fraction'])} of each value held out). `full`: "
             f"logistic regression on all of `{s['sae_hook']}`; 1-sparse: the best single unit; "
             f"{cfg['probe_k']}-sparse: {cfg['probe_k']} units chosen by class separation on the training split.",
             ""]
    header = ["attribute", "train/test", "baseline", "full"]
    for k in kinds:
        header += [f"{k} 1-sparse", f"{k} {cfg['probe_k']}-sparse"]
    rows = []
    for name, r in probe_table(result).items():
        cells = [name, f"{r['n_train']}/{r['n_test']}", _pct(r["baseline"]),
                 _pct(r.get("full")) + _ci(r.get("full ci"))]
        for k in kinds:
            cells += [_pct(r.get(f"{k} 1")) + _ci(r.get(f"{k} 1 ci")), _pct(r.get(f"{k} k")) + _ci(r.get(f"{k} k ci"))]
        rows.append(cells)
    lines.append(_table(header, rows))
    if "probes" in plots:
        lines += ["", f"![probes]({plots['probes']})"]
    return lines


def _md_tags(result: LabelResult) -> list[str]:
    kinds = _kinds(result)
    rows = []
    for a in result.attributes:
        if a.skipped:
            continue
        best = []
        for k in kinds:
            b = sorted(a.best.get(k, []), key=lambda d: -d["f1"])[:3]
            best.append("; ".join(f"{d['value']}: #{d['unit']} F1 {d['f1']:.2f} AUROC {d['auroc']:.2f}" for d in b))
        rows.append([a.name, len(a.values)] + [f"{a.n_tags.get(k, 0)}{_ci(a.n_tags_ci.get(k), _count)}"
                                               for k in kinds] + best)
    return ["", "## Tags per attribute", "", "Tag counts with their 95% bootstrap interval over the known entities "
            "(resampled by value; the spread placed around the count).",
            "",
            _table(["attribute", "values"] + [f"{k} tags" for k in kinds] + [f"best {k}s (any F1)" for k in kinds],
                   rows)]


def _causal_row(c: CausalResult, tag: Tag | None) -> list[Any]:
    """One causal test as a table row, with its tag's F1 and AUROC."""
    steer = f"→ {c.steer_value}: {c.steer_shift:+.2f} nats, flips {_pct(c.steer_flip)}" if c.steer_value else "–"
    return [c.kind, c.index, f"{c.entity_type}.{c.attribute} = {c.value}", _num(tag.f1 if tag else None, ".2f"),
            _num(tag.auroc if tag else None, ".2f"), c.n_prompts, _num(c.drop), _num(c.control_mean),
            _num(c.effect, "+.3f") + _ci(c.effect_ci, lambda x: _num(x, "+.3f")), _num(c.p, ".2g"),
            _num(c.p_holm, ".2g"), c.status if c.status != "not tested" else f"not tested ({c.reason})", steer]


def _md_causal(result: LabelResult, plots: dict[str, str]) -> list[str]:
    cfg = result.settings["label_config"]
    lines = ["", "## Causal checks", "",
             f"Each tested tag's unit is removed at the entity's tokens of up to {cfg['causal_prompts']} attribute "
             "prompts (those where the tag says it is on); drop = mean fall of the correct answer's log-probability "
             "(nats). "
             f"Controls: {cfg['causal_controls']} random units of the same kind and similar firing frequency, each "
             "removed on every prompt (its own contribution where it is on there, else the unit's activation "
             "rescaled to the control's typical one). Effect = mean over prompts of (drop − controls' mean drop), "
             "with its 95% bootstrap interval; p: one-sided sign-flip test over prompts; Holm p: corrected across "
             f"all {len([c for c in result.causal if c.p is not None])} tags tested, features and neurons together. "
             f"\"causal\" needs Holm p < 0.05 and an effect ≥ {cfg['causal_min_effect']} nats. Steering adds "
             "activation × (decoder row of another value's best tagged feature − this decoder row).", ""]
    tag_by = {(t.kind, t.index, t.entity_type, t.attribute, t.value): t for t in result.tags}
    rows = [_causal_row(c, tag_by.get((c.kind, c.index, c.entity_type, c.attribute, c.value)))
            for c in result.causal]
    lines.append(_table(["kind", "unit", "tag", "F1", "AUROC", "prompts", "drop", "controls", "effect [95% CI]", "p",
                         "Holm p", "status", "steering"], rows) if rows else
                 "No tag was tested (no tags, or label.causal_tags: 0).")
    if "causal" in plots:
        lines += ["", f"![causal]({plots['causal']})"]
    return lines


def _md_skipped(result: LabelResult) -> list[str]:
    skipped = [a for a in result.attributes if a.skipped]
    return ["", "## Attributes skipped", "",
            _table(["attribute", "why"], [[a.name, a.skipped] for a in skipped]) if skipped else "None."]


def _md_semantics(result: LabelResult, semantics: dict[str, Any]) -> list[str]:
    th = semantics["thresholds"]
    lines = ["", "## Monosemanticity", "",
             "Concepts: token identity, rule-based lexical classes, entity-attribute values"
             + (f", WordNet lexnames and hypernyms ({semantics['wordnet']})" if semantics.get("wordnet") else
                " (WordNet not installed: no WordNet concepts; run scripts/ensure_wordnet.sh)")
             + f"; base rates over the store's {semantics.get('n_tokens', 0):,} analysed tokens. Score: the "
             "largest lower-bound P(concept | unit fires) over concepts at least "
             f"{th['min_enrichment']:g}× enriched, from interval examples across the whole activation range; "
             f"monosemantic at ≥ {th['mono_threshold']}; dead / too rare below {th['min_fires']} firings or "
             f"{th['min_examples']} examples (see features/labeling/semantics.py).", ""]
    rule = semantics.get("on_rule") or {}
    if rule.get("neuron_rate") is not None:
        lines[-1:-1] = ["", "One rule for both kinds: a unit fires when above its on threshold, 0 for features "
                        "and, for neurons (signed, SiLU-gated), their own quantile that leaves them on as often as the "
                        f"median live feature: {_pct(rule['neuron_rate'])} of tokens, set on the analysis pass's first "
                        f"{rule['calibration_tokens']:,} tokens (features/analyze/on_rule.py). Examples weigh by "
                        "their activation above the threshold."]
    rows = []
    for k in _kinds(result):
        d = semantics.get(k)
        if not d:
            continue
        cl = d["classes"]
        rows.append([k, d["n"], cl.get("monosemantic", 0), cl.get("polysemantic", 0), cl.get("dead", 0),
                     _pct(d["mono_share"]) + _ci(d.get("mono_share_ci")), _pct(d["mono_share_top"]),
                     _num(d["mean_score"]),
                     ", ".join(f"{f} {n}" for f, n in sorted(d["mono_concept_kinds"].items(), key=lambda p: -p[1]))])
    lines.append(_table(["kind", "units", "monosemantic", "polysemantic", "dead/rare", "mono share",
                         "mono share (top only)", "mean score", "monosemantic by concept family"], rows))
    return lines


def render_markdown(result: LabelResult, semantics: dict[str, Any] | None, meta: dict[str, Any],
                    plots: dict[str, str]) -> str:
    """label.md; `plots` maps plot names to the PNG files written beside it (none: no images)."""
    lines = _md_intro(result, meta) + _md_headline(result, semantics, plots) + _md_knowledge(result, plots)
    lines += _md_probes(result, plots) + _md_tags(result) + _md_causal(result, plots) + _md_skipped(result)
    if semantics:
        lines += _md_semantics(result, semantics)
    lines += ["", "## Timings", "", _table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in
                                                                   sorted(result.timings.items())]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend)


COLORS = {"feature": "tab:blue", "neuron": "tab:orange", "full": "tab:gray"}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plot_semantics(plt: Any, semantics: dict[str, Any], kinds: list[Kind]) -> bytes:
    """Score histograms per kind, and the monosemantic shares (whole range vs top examples)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in kinds:
        d = semantics.get(k)
        if d and d["scores"]:
            ax1.hist([x for x in d["scores"] if x is not None], bins=20, range=(0, 1), alpha=0.6, density=True,
                     label=f"{k}s", color=COLORS[k])
    ax1.axvline(semantics["thresholds"]["mono_threshold"], color="k", ls="--", lw=1)
    ax1.set_xlabel("monosemanticity score")
    ax1.set_ylabel("density")
    ax1.legend()
    width = 0.35
    for i, k in enumerate(kinds):
        d = semantics.get(k) or {}
        vals = [d.get("mono_share") or 0, d.get("mono_share_top") or 0]
        ax2.bar([j + i * width for j in range(2)], [100 * v for v in vals], width, label=f"{k}s", color=COLORS[k])
    ax2.set_xticks([j + width / 2 for j in range(2)], ["whole range", "top only"])
    ax2.set_ylabel("monosemantic units (%)")
    ax2.legend()
    return _png(fig)


def _plot_probes(plt: Any, probes: dict[str, dict[str, Any]], kinds: list[Kind]) -> bytes:
    """Held-out accuracy per attribute and probe, with the majority baseline."""
    names = list(probes)
    series = [("full", "full")] + [(f"{k} 1", f"{k} 1-sparse") for k in kinds] + [(f"{k} k", f"{k} k-sparse")
                                                                                    for k in kinds]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 3.8))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        vals = [100 * (probes[n].get(key) or 0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=label, color=COLORS[key.split()[0]],
               alpha=1.0 if key.endswith("1") or key == "full" else 0.5)
    ax.scatter([j + 0.4 - width / 2 for j in range(len(names))], [100 * probes[n]["baseline"] for n in names],
               marker="_", s=400, color="k", label="majority baseline", zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3)
    return _png(fig)


def _plot_causal(plt: Any, tested: list[CausalResult], kinds: list[Kind], min_effect: float) -> bytes:
    """Each tested tag's effect (its drop minus the controls' mean drop, nats) with its 95% interval over prompts;
    diamonds are causal (Holm p < 0.05 and effect >= the minimum, the dashed line)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(tested) + 2), 3.8))
    for i, c in enumerate(tested):
        lo, hi = c.effect_ci or (c.effect, c.effect)
        ax.errorbar([i], [c.effect], yerr=[[c.effect - lo], [hi - c.effect]], color=COLORS[c.kind], capsize=3,
                    marker="D" if c.status == "causal" else "o", markersize=6 if c.status == "causal" else 4)
    for k in kinds:
        ax.scatter([], [], color=COLORS[k], label=f"tagged {k}")
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(min_effect, color="k", lw=0.8, ls="--", label="minimum effect")
    ax.set_xticks(range(len(tested)), [f"{c.kind[0]}{c.index} {c.attribute}={c.value}"[:28] for c in tested],
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("drop − random units' drop (nats)")
    ax.legend(fontsize=7)
    return _png(fig)


def _plot_knowledge(plt: Any, known: list[AttributeReport]) -> bytes:
    """The share of entities the model knows, per attribute."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(known) + 2), 3.2))
    ax.bar(range(len(known)), [100 * a.kept_fraction for a in known], color="tab:green")
    ax.set_xticks(range(len(known)), [a.name for a in known], rotation=30, ha="right")
    ax.set_ylabel("entities the model knows (%)")
    ax.set_ylim(0, 100)
    return _png(fig)


def render_plots(result: LabelResult, semantics: dict[str, Any] | None) -> dict[str, bytes]:
    """PNG bytes per plot name (matplotlib, Agg backend); a plot with nothing to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    kinds = _kinds(result)
    if semantics and any(semantics.get(k) for k in kinds):
        out["semantics"] = _plot_semantics(plt, semantics, kinds)
    probes = probe_table(result)
    if probes:
        out["probes"] = _plot_probes(plt, probes, kinds)
    tested = [c for c in result.causal if c.effect is not None]
    if tested:
        out["causal"] = _plot_causal(plt, tested, kinds, result.settings["label_config"]["causal_min_effect"])
    known = [a for a in result.attributes if a.kept_fraction is not None]
    if known:
        out["knowledge"] = _plot_knowledge(plt, known)
    return out


# ---------------------------------------------------------------------------------------------
# The folder


DIRECTIONS_POINTER = ("cause_fraction and disentanglement are run-level figures across layers, null for one SAE: "
                      "`saekit directions` writes them to runs/<name>/reports/run/label.json from one SAE per early "
                      "layer (configs/smollm2_directions.yaml)")


def result_json(result: LabelResult, semantics: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """label.json: the report's numbers, machine-readable (the semantics summary without per-unit scores)."""
    sem = None
    if semantics:
        sem = {k: ({kk: vv for kk, vv in v.items() if kk != "scores"} if isinstance(v, dict) else v)
               for k, v in semantics.items()}
    return {"meta": meta, "wordnet": bool(semantics and semantics.get("wordnet")), "settings": result.settings,
            "timings": result.timings, "headline": headline(result, semantics, meta.get("seeds")),
            "directions": DIRECTIONS_POINTER,
            "attributes": [asdict(a) for a in result.attributes],
            "probes": [asdict(p) for p in result.probes], "causal": [asdict(c) for c in result.causal],
            "n_tags": {k: sum(t.kind == k for t in result.tags) for k in KINDS},
            "semantics": sem}


def write_report(folder: Path, outcome: LabelOutcome, plots: bool = True) -> Path:
    """Write label.md, label.json and (with `plots`) the PNG plots into `folder`; returns the Markdown file."""
    result, semantics, meta = outcome
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if plots:
        for name, data in render_plots(result, semantics).items():
            atomic_write_bytes(folder / PLOTS[name], data)
            written[name] = PLOTS[name]
    atomic_write_text(folder / "label.json", json.dumps(result_json(result, semantics, meta), indent=1,
                                                        default=str) + "\n")
    md = folder / "label.md"
    atomic_write_text(md, render_markdown(result, semantics, meta, written))
    return md
