"""The lookup-by-layer page: where the attributes become readable and which MLP layers write their directions,
read from the run report's lookup.png, lookup.md and lookup.json (written by `features.labeling.lookup`)."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from features.labeling.lookup import LOOKUP_JSON, LOOKUP_MD, LOOKUP_PNG
from features.viewer.nav import done

BUILD_COMMAND = "saekit lookup --config runs/<name>/config.yaml"
EXPLANATION = (
    "Fact-recall studies found early MLP layers acting as a lookup from an entity's tokens to directions for its "
    "attributes. Each panel shows, layer by layer, how well a linear probe reads one attribute at the entity's "
    "last token of the attribute prompt, on held-out entities: from the residual stream (solid) and from that "
    "layer's MLP output alone (dashed), with 95% bands and the majority-value baseline (dotted). The last panel "
    "and the *MLP share* columns split the residual stream's projection onto the attribute's direction (at the "
    "deepest layer shown) by the MLP layer that wrote it; the rest came from the embedding and attention.")


def render(report_dir: Path | None, command: str = BUILD_COMMAND) -> None:
    """Show the run's lookup picture, or say that it is not built yet and which command builds it."""
    st.title("Where the lookup happens")
    files = [report_dir / name for name in (LOOKUP_MD, LOOKUP_PNG, LOOKUP_JSON)] if report_dir is not None else []
    if not files or not all(f.is_file() for f in files):
        where = f"`{report_dir}`" if report_dir is not None else "this viewer (open it with `--run runs/<name>`)"
        st.info(f"No lookup-by-layer report in {where} yet. Build it with:")
        st.code(command, language="bash")
        done("lookup")
        return
    md, png, js = files
    data = json.loads(js.read_text())
    scored = [a for a in data["attributes"] if a.get("skipped") is None]
    st.caption(f"`{data['model_name']}`, layers 0-{data['layers'][-1]} of {data['n_layers']}; "
               f"{len(scored)} of {len(data['attributes'])} attributes probed. Files: `{report_dir}`.")
    st.markdown(EXPLANATION)
    st.image(str(png))
    text = md.read_text()
    st.markdown(text.split("\n", 1)[1] if text.startswith("# ") else text)  # the page has its own title
    done("lookup")
