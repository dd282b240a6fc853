"""scripts/device_check.sh in smoke mode, on a simulated bare GPU machine.

The GPU machine has python3 with torch, transformers, safetensors and numpy (and triton), and none of
transformer-lens, sae-lens, eai-sparsify or pytest. The simulation: `python -S` (no site-packages) with
PYTHONPATH holding only those packages and their dependencies, symlinked from this environment, and a
wheels folder holding eai-sparsify and what its coder imports, zipped from this environment as
scripts/build_device_wheels.sh would download them.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sae.saes import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
ON_THE_MACHINE = ("torch", "transformers", "safetensors", "numpy")
IN_THE_WHEELS = ("eai-sparsify", "simple-parsing", "docstring-parser", "natsort", "einops", "accelerate", "psutil")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions `names` need, dependencies included (extras left out)."""
    todo, seen, out = list(names), set(), []
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        seen.add(_key(name))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        out.append(dist)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    return out


def _top_levels(dist: md.Distribution) -> set[str]:
    return {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}


def _bare_site(folder: Path) -> Path:
    folder.mkdir()
    for dist in _closure(ON_THE_MACHINE):
        for top in _top_levels(dist):
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists():
                (folder / top).symlink_to(src)
    return folder


def _wheels(folder: Path) -> Path:
    """Each installed package of IN_THE_WHEELS zipped as a wheel (a wheel is a zip of importable files)."""
    folder.mkdir()
    for name in IN_THE_WHEELS:
        dist = md.distribution(name)
        with zipfile.ZipFile(folder / f"{_key(name).replace('-', '_')}-{dist.version}-py3-none-any.whl", "w") as zf:
            for f in dist.files or []:
                path = Path(dist.locate_file(f))
                if f.parts[0] in _top_levels(dist) and path.is_file() and "__pycache__" not in f.parts:
                    zf.write(path, str(f))
    return folder


@pytest.mark.slow
def test_smoke_mode_runs_every_section_on_a_bare_machine(tmp_path):
    env = {**os.environ, "DEVICE_CHECK_SMOKE": "1", "PYTHON": f"{sys.executable} -S",
           "PYTHONPATH": str(_bare_site(tmp_path / "site")), "DEVICE_WHEELS": str(_wheels(tmp_path / "wheels"))}
    proc = subprocess.run([str(REPO / "scripts" / "device_check.sh")], env=env, capture_output=True, text=True)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    for banner in ("[0] environment  (SMOKE MODE", "[A] kernels on cpu", "[B] training on cpu",
                   "[C] cache writer on cpu", "[D] kernel choice on cpu", "SUMMARY (smoke mode"):
        assert banner in out
    assert re.search(r"transformer_lens\s+absent", out) and re.search(r"sae_lens\s+absent", out)
    assert re.search(r"sparsify\s+\d", out), "eai-sparsify from the wheels folder did not load"
    for arch in ARCHITECTURES:
        for case in ("fp32", "fp32 transcoder", "bf16"):
            assert re.search(rf"^A kernels\s+{arch} {case}\s+match\s", out, re.M), f"{arch} {case}"
    assert re.search(r"^B training\s+saekit / eai-sparsify tokens/s \(same Adam\)\s+\d", out, re.M)
    assert re.search(r"^B training\s+bf16 encoder-matmul roofline fraction\s+\d", out, re.M)
    assert "optimizer: the same for every trainer, torch.optim.Adam(fused)" in out
    for dtype in ("float32", "bfloat16"):
        assert re.search(rf"^C cache\s+writer / bare forward \({dtype}, 1 writer thread\(s\)\)\s+\d", out, re.M)
    assert re.search(r"^D kernel choice\s+trainer's path vs fastest\s+sparse kernels", out, re.M)
    assert "ERROR" not in out and "FAIL" not in out
    assert "device check passed" in out
