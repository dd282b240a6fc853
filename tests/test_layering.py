"""The architecture's rules, checked: import layers, one hooks seam, one owner of run paths, size limits."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [ROOT / "sae", ROOT / "features"]
SOURCES = sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py")) + [ROOT / "app_streamlit.py"]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_import_contracts_hold():
    """import-linter: sae never imports features, layers point down, no circles (pyproject.toml)."""
    linter = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _calls(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            out.append(node.func.attr)
    return out


def test_only_the_hooks_seam_registers_hooks():
    hooking = {"hooks", "run_with_hooks", "run_with_cache", "add_hook"}
    offenders = []
    for path in SOURCES:
        if path == ROOT / "sae" / "hooks.py":
            continue
        used = hooking & set(_calls(ast.parse(path.read_text())))
        if used:
            offenders.append(f"{_rel(path)}: {sorted(used)}")
    assert offenders == [], "model hooks outside sae/hooks.py: " + "; ".join(offenders)


def _strings(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            docs.add(id(body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_run_layout_spells_run_paths():
    owner = ROOT / "features" / "layout.py"
    names = ("saes", "checkpoints", "features.db", "tokens.safetensors", "state.safetensors", "metrics.jsonl")
    offenders = []
    for path in SOURCES:
        if path == owner:
            continue
        for text in _strings(ast.parse(path.read_text())):
            code_like = not any(c.isspace() for c in text)  # help texts and messages may show paths to people
            if code_like and (text in names or any(text.endswith(f"/{n}") or text.startswith(f"{n}/") for n in names)):
                offenders.append(f"{_rel(path)}: {text!r}")
    assert offenders == [], "run paths spelled outside features/layout.py: " + "; ".join(offenders)


def test_files_and_functions_stay_small():
    long_files = [f"{_rel(p)} ({n})" for p in SOURCES if (n := len(p.read_text().splitlines())) > 600]
    long_functions = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert long_files == [] and long_functions == [], (long_files, long_functions)


def test_app_streamlit_is_a_thin_entry():
    assert len((ROOT / "app_streamlit.py").read_text().splitlines()) <= 20


def test_engine_imports_without_transformer_lens():
    """The SAE classes, kernels and trainer load on a machine without transformer-lens (the GPU box)."""
    code = ("import sys; sys.modules['transformer_lens'] = None; "
            "from sae import SAESpec, TopKConfig, TrainConfig, build_job, tensor_batches, train, save_sae; "
            "import sae.saes.kernels, sae.trainer, sae.checkpoint; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
