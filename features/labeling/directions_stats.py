"""The figures of the attribute directions: per attribute and kind, cause, upper bound, isolation and
disentanglement with 95% bootstrap intervals over pairs, a paired sign-flip test against size-matched random groups
(Holm-corrected across attributes within each kind), and the run's headline.

The thresholds are fixed here, before any result is seen (issue 10): an attribute *qualifies* when interchanging
the whole MLP outputs moves at least `QUALIFY` of its pairs; a direction *holds* when its cause reaches
`HOLD_FRACTION` of that upper bound and it beats random groups at family-wise `ALPHA`. The headline averages over the
qualifying attributes; the target is `TARGET` of them, or all when fewer qualify.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from features.labeling.directions import DIR_KINDS, UNIT_RULES, AttributeOutcomes, DirectionsResult
from features.labeling.significance import Interval, bootstrap_of_means, holm, sign_flip_test

QUALIFY = 0.3
HOLD_FRACTION = 0.5
ALPHA = 0.05
TARGET = 8
HEADLINE_KEYS = ("attributes_scored", "attributes_causal", "cause_fraction", "cause_fraction_ci", "disentanglement",
                 "disentanglement_ci", "monosemantic_share", "monosemantic_share_ci", "seeds")
DEFINITIONS = {
    "cause": "share of held-out (base, source) pairs whose answer moves to the source's value when the chosen units "
             "of every layer take the source's values at the entity's last token",
    "upper_bound": "the same with every layer's whole hook_mlp_out taken from the source",
    "fraction": "cause / upper bound",
    "isolation": "share of (pair, other attribute of the entity type) where the base's other attribute keeps its "
                 "value when the same units are interchanged in that attribute's prompt",
    "disentanglement": "mean of cause and isolation; cause alone where isolation is undefined",
    "p": "one-sided paired sign-flip test over pairs of (chosen outcome - mean outcome of the pair's random groups, "
         "size-matched per layer and drawn afresh for each pair)",
    "holds": f"cause >= {HOLD_FRACTION} x upper bound and Holm-corrected p < {ALPHA} (across attributes, per kind)",
    "qualifies": f"upper bound >= {QUALIFY}",
    "attributes_scored": "attributes whose directions were measured (after the knowledge filter)",
    "attributes_causal": "qualifying attributes whose direction holds",
    "cause_fraction": "mean over qualifying attributes of cause / upper bound; CI bootstraps pairs per attribute",
    "headline disentanglement": "mean over qualifying attributes of their disentanglement",
    "all features": "every feature of every SAE interchanged at once, as a fraction of the upper bound: the ceiling "
                    "of any feature group, since each SAE's reconstruction error stays the base's",
}


def _num(x: float | None) -> float | None:
    """JSON-safe: NaN becomes null, floats are rounded for reading."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def _ci(iv: Interval | None) -> list[float | None]:
    return [None, None] if iv is None else [_num(iv.lo), _num(iv.hi)]


def _ratio(means: np.ndarray, col: int = 0) -> np.ndarray:
    """[R] cause / upper bound from column means [R, c] whose last column is the upper bound; NaN where it is 0."""
    bound = means[:, -1]
    return np.where(bound > 0, means[:, col] / np.where(bound > 0, bound, 1.0), np.nan)


def _mean_ci(x: np.ndarray, seed: int) -> Interval:
    return bootstrap_of_means([x], lambda m: m[0][:, 0], seed=seed)


def _groups_mean(means: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """[R] mean over attributes of the mean of each attribute's groups (cause, and isolation where defined)."""
    out, at = [], 0
    for n in sizes:
        out.append(np.mean([m[:, 0] for m in means[at:at + n]], 0))
        at += n
    return np.mean(out, 0)


def _disentanglement(o: AttributeOutcomes, kind: str, seed: int) -> tuple[Interval, str]:
    chosen, iso = o.chosen[kind], o.isolation.get(kind)
    if iso is None or len(iso) == 0:
        return _mean_ci(chosen, seed), "cause only (no other known attribute of this entity type)"
    return bootstrap_of_means([chosen, iso], lambda m: _groups_mean(m, [2]), seed=seed), "cause and isolation"


def _kind_row(o: AttributeOutcomes, kind: str, seed: int) -> dict[str, Any]:
    """One attribute's figures for one kind (p_holm, significant and holds are filled in across attributes)."""
    chosen, iso = o.chosen[kind], o.isolation.get(kind)
    cause = _mean_ci(chosen, seed)
    frac = bootstrap_of_means([np.stack([chosen, o.upper], 1)], lambda m: _ratio(m[0]), seed=seed)
    iso_ci = _mean_ci(iso, seed) if iso is not None and len(iso) else None
    dis, dis_from = _disentanglement(o, kind, seed)
    return {"cause": _num(cause.value), "cause_ci": _ci(cause), "fraction": _num(frac.value), "fraction_ci": _ci(frac),
            "random_cause": _num(float(o.random[kind].mean())), "random_groups": int(o.random[kind].shape[0]),
            "p": float(sign_flip_test(chosen - o.random[kind].mean(0), seed=seed)), "p_holm": None,
            "significant": False, "holds": False,
            "isolation": _num(iso_ci.value) if iso_ci else None, "isolation_ci": _ci(iso_ci),
            "n_isolation": 0 if iso is None else len(iso),
            "disentanglement": _num(dis.value), "disentanglement_ci": _ci(dis), "disentanglement_from": dis_from,
            "units_per_layer": [len(u) for u in o.units[kind]], "units": o.units[kind],
            "units_moved": _num(o.moved.get(kind))}


def _attribute_row(o: AttributeOutcomes, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"attribute": o.name, "entity_type": o.entity_type, "skipped": o.skipped}
    if o.skipped:
        return row
    upper = _mean_ci(o.upper, seed)
    ceiling = (bootstrap_of_means([np.stack([o.all_features, o.upper], 1)], lambda m: _ratio(m[0]), seed=seed)
               if o.all_features is not None else None)
    row.update(values=o.values, n_known=o.n_known, n_train=len(o.train), n_heldout=len(o.heldout),
               pairs=len(o.pairs), upper_bound=_num(upper.value), upper_bound_ci=_ci(upper),
               all_features_fraction=_num(ceiling.value) if ceiling else None, all_features_fraction_ci=_ci(ceiling),
               qualifies=bool(upper.value >= QUALIFY), isolation_on=o.other_attributes,
               kinds={kind: _kind_row(o, kind, seed) for kind in DIR_KINDS})
    return row


def _holm_and_holds(rows: list[dict[str, Any]], outcomes: list[AttributeOutcomes]) -> None:
    """Holm across the scored attributes within each kind, then which directions hold (on the unrounded means)."""
    scored = [(r, o) for r, o in zip(rows, outcomes, strict=True) if not r["skipped"]]
    for kind in DIR_KINDS:
        adjusted, rejected = holm([r["kinds"][kind]["p"] for r, _ in scored], ALPHA)
        for (r, o), p, sig in zip(scored, adjusted, rejected, strict=True):
            cell = r["kinds"][kind]
            cell["p_holm"], cell["significant"] = float(p), bool(sig)
            cell["holds"] = bool(sig and o.chosen[kind].mean() >= HOLD_FRACTION * o.upper.mean())


def _headline(result: DirectionsResult, qualified: list[AttributeOutcomes], rows: dict[str, dict[str, Any]],
              kind: str, monosemantic: dict[str, Any] | None) -> dict[str, Any]:
    seed = result.settings["directions"]["seed"]
    frac = bootstrap_of_means([np.stack([o.chosen[kind], o.upper], 1) for o in qualified],
                              lambda ms: np.mean([_ratio(m) for m in ms], 0), seed=seed)
    arrays, sizes = [], []
    for o in qualified:
        iso = o.isolation.get(kind)
        parts = [o.chosen[kind]] + ([iso] if iso is not None and len(iso) else [])
        arrays += parts
        sizes.append(len(parts))
    dis = bootstrap_of_means(arrays, lambda ms: _groups_mean(ms, sizes), seed=seed)
    mono = (monosemantic or {}).get(kind)
    return {"attributes_scored": sum(1 for r in rows.values() if not r["skipped"]),
            "attributes_causal": sum(rows[o.name]["kinds"][kind]["holds"] for o in qualified),
            "cause_fraction": _num(frac.value), "cause_fraction_ci": _ci(frac),
            "disentanglement": _num(dis.value), "disentanglement_ci": _ci(dis),
            "monosemantic_share": None if mono is None else _num(mono[0]),
            "monosemantic_share_ci": [None, None] if mono is None else [_num(x) for x in mono[1]],
            "seeds": list(result.seeds)}


def _features_minus_neurons(qualified: list[AttributeOutcomes], seed: int) -> dict[str, Any]:
    """Difference of cause fractions, pairs resampled jointly for both kinds (they are the same pairs)."""

    def diff(ms: list[np.ndarray]) -> np.ndarray:
        return np.mean([_ratio(m, 0) - _ratio(m, 1) for m in ms], 0)

    iv = bootstrap_of_means([np.stack([o.chosen["feature"], o.chosen["neuron"], o.upper], 1) for o in qualified],
                            diff, seed=seed)
    return {"cause_fraction_diff": _num(iv.value), "ci": _ci(iv)}


def _all_features(qualified: list[AttributeOutcomes], seed: int) -> dict[str, Any]:
    """Every feature of every SAE interchanged, as a fraction of the upper bound (mean over qualifying attributes):
    the most any group of features could carry, since the SAEs' reconstruction error stays the base's."""
    done = [o for o in qualified if o.all_features is not None]
    if not done:
        return {"fraction": None, "ci": [None, None]}
    iv = bootstrap_of_means([np.stack([o.all_features, o.upper], 1) for o in done],
                            lambda ms: np.mean([_ratio(m) for m in ms], 0), seed=seed)
    return {"fraction": _num(iv.value), "ci": _ci(iv)}


def _layer_rows(result: DirectionsResult, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each patched layer with the mean number of units chosen there per scored attribute, per kind."""
    scored = [r for r in rows if not r["skipped"]]
    return [{**layer, "mean_units_chosen": {kind: _num(float(np.mean([r["kinds"][kind]["units_per_layer"][i]
                                                                      for r in scored]))) if scored else None
                                            for kind in DIR_KINDS}}
            for i, layer in enumerate(result.layers)]


def summarize(result: DirectionsResult, monosemantic: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run-level `label.json` content: headline per kind, per-attribute rows, layers and settings.
    `monosemantic`: optional kind -> (share, [lo, hi]) from the like-for-like monosemanticity scores."""
    seed = result.settings["directions"]["seed"]
    rows = [_attribute_row(o, seed) for o in result.attributes]
    _holm_and_holds(rows, result.attributes)
    by_name = {r["attribute"]: r for r in rows}
    qualified = [o for o in result.attributes if not o.skipped and by_name[o.name]["qualifies"]]
    headline = {kind: _headline(result, qualified, by_name, kind, monosemantic) for kind in DIR_KINDS}
    needed = min(TARGET, len(qualified))
    fmn = _features_minus_neurons(qualified, seed)
    layers = _layer_rows(result, rows)
    rule = result.settings.get("directions", {}).get("unit_rule", "anova")
    return {"headline": headline, "features_minus_neurons": fmn, "all_features": _all_features(qualified, seed),
            "qualified": len(qualified),
            "target": {"attributes_needed": needed,
                       "feature_directions_met": bool(qualified) and headline["feature"]["attributes_causal"] >= needed,
                       "features_beat_neurons": fmn["ci"][0] is not None and fmn["ci"][0] > 0},
            "attributes": rows, "layers": layers,
            "settings": {**result.settings, "qualify_upper_bound": QUALIFY, "hold_fraction": HOLD_FRACTION,
                         "alpha": ALPHA, "target_attributes": TARGET, "unit_rule": UNIT_RULES[rule],
                         "definitions": DEFINITIONS, "timings": result.timings}}
