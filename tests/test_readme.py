"""README's Python API example runs exactly as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_and_saves_in_sae_lens_format(tmp_path):
    code = _example()
    assert len(code.strip().splitlines()) <= 15
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TopKSAE(topk, d_in=576, d_sae=4608" in proc.stdout
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(tmp_path / "my_sae"))
    assert loaded.cfg.d_in == 576 and loaded.cfg.d_sae == 4608
