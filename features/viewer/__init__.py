"""saekit's feature browser, a Streamlit app in pages (overview, list, unit, compare, live text, export).

`APP_FILE` is the script `streamlit run` executes (what `saekit view` serves). This package's own import loads no
Streamlit, so the CLI can name the script without paying for it.
"""

from pathlib import Path

APP_FILE: Path = Path(__file__).resolve().parent / "app.py"
