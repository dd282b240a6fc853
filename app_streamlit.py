"""Entry for `streamlit run app_streamlit.py -- --run runs/<name>` (or `--store <features.db> --sae <SAE dir>`).

The viewer itself is `features/viewer/app.py` (what `saekit view` serves); this file only hands it the arguments
given after `--` when Streamlit runs this file, and none under AppTest (which uses SAEKIT_VIEW_* instead).
"""

import sys
from pathlib import Path

from features.viewer.app import main

main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])
