"""The attribute-directions page: which groups of units carry an entity's attribute across the early MLP layers,
tested by interchange, read from the run report's label.json, label.md and plot (written by
`features.run_report`); features, neurons and the baseline side by side, each against the upper bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import streamlit as st

from features.run_report import FILES, NAMES
from features.viewer.nav import done

BUILD_COMMAND = "saekit directions --config runs/<name>/config.yaml"
EXPLANATION = (
    "A direction is a group of at most the budgeted units per layer (SAE features of each layer's MLP output, the "
    "same layers' MLP neurons, or a baseline rotation of the MLP output), chosen per attribute on training "
    "entities. On held-out (base, source) pairs the group's values are copied from the source entity into the "
    "base prompt at the entity's last token, in every layer at once. **Cause** is the share of pairs where the "
    "model's choice moves to the source's value; the **upper bound** interchanges the whole MLP outputs of those "
    "layers. The bars show cause / upper bound with 95% intervals over pairs; the dashed line is where a direction "
    "holds (if it also beats size-matched random groups after Holm correction).")


def _headline_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per kind for the headline table (st.dataframe)."""
    rows = []
    for kind, h in data["headline"].items():
        ci = h.get("cause_fraction_ci") or [None, None]
        dci = h.get("disentanglement_ci") or [None, None]
        rows.append({"kind": NAMES.get(kind, kind), "directions that hold": h.get("attributes_causal"),
                     "qualifying attributes": data.get("qualified"), "cause / upper bound": h.get("cause_fraction"),
                     "95% CI": _pair(ci), "disentanglement": h.get("disentanglement"), "95% CI ": _pair(dci)})
    return rows


def _pair(ci: list[float | None]) -> str:
    return "–" if ci[0] is None or ci[1] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def render(report_dir: Path | None, command: str = BUILD_COMMAND) -> None:
    """Show the run's attribute directions, or say that they are not built yet and which command builds them."""
    st.title("Attribute directions across layers")
    js = report_dir / FILES["json"] if report_dir is not None else None
    md = report_dir / FILES["markdown"] if report_dir is not None else None
    if js is None or md is None or not js.is_file() or not md.is_file():
        where = f"`{report_dir}`" if report_dir is not None else "this viewer (open it with `--run runs/<name>`)"
        st.info(f"No attribute-directions report in {where} yet. Build it with:")
        st.code(command, language="bash")
        done("directions")
        return
    data = json.loads(js.read_text())
    layers = ", ".join(str(x["layer"]) for x in data.get("layers", []))
    st.caption(f"Layers {layers}; {data.get('qualified', 0)} attributes qualify (known and upper bound high enough). "
               f"Files: `{report_dir}`.")
    st.markdown(EXPLANATION)
    if "unit_rule" in data.get("settings", {}):
        st.caption(f"Unit choice: {data['settings']['unit_rule']}.")
    st.dataframe(_headline_rows(data), hide_index=True)
    png = report_dir / FILES["plot"]
    if png.is_file():
        st.image(str(png))
    text = md.read_text()
    st.markdown(text.split("\n", 1)[1] if text.startswith("# ") else text)  # the page has its own title
    done("directions")
