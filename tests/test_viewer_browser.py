"""End to end in a real browser: `streamlit run` of the viewer's APP_FILE on a small real store, driven by headless
Chromium through Playwright. Opens the overview, searches for a tagged feature and opens it by clicking its row,
checks the highlighted examples and the tags, runs live text and steering, and saves a screenshot of each page
under test-output/viewer/ (gitignored; the path is printed).

Chromium comes from Debian's `chromium` package (`scripts/ensure_chromium.sh`, run by `make test`); Playwright's
own browser download is not used. Without Chromium the test is skipped and says why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_viewer import APP, llama_run  # noqa: F401 - the fixture is shared with the AppTest suite

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "viewer"
WAIT_MS = 180_000  # a hang guard for a busy machine, not a speed requirement
PlaywrightTimeout: type[Exception] = TimeoutError  # playwright's, once it is imported

pytestmark = pytest.mark.real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama_run: Path) -> Iterator[str]:  # noqa: F811 - the imported fixture
    """The viewer served by `streamlit run` for the tiny Llama run; yields its base URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAEKIT_VIEW_")}
    env["SAEKIT_VIEW_RUN"] = str(llama_run)
    log = (llama_run / "streamlit.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
                             "--client.toolbarMode", "viewer"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {(llama_run / 'streamlit.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page() -> Iterator[object]:
    """Headless Chromium; skips (before any server starts) where Chromium or Playwright is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}: run `sudo scripts/ensure_chromium.sh` (apt-get install "
                    "chromium), or set CHROMIUM to a Chromium binary")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    global PlaywrightTimeout
    PlaywrightTimeout = sync_api.TimeoutError
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(WAIT_MS)
        yield pg
        browser.close()


def shot(pg: object, name: str) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside its main section, so grow the viewport to fit."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.wait_for_timeout(600)  # let charts and fonts settle
    height = pg.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    pg.set_viewport_size({"width": 1440, "height": min(max(height + 40, 1000), 8000)})
    pg.wait_for_timeout(300)
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path))
    pg.set_viewport_size({"width": 1440, "height": 1000})
    print(f"screenshot: {path}")
    return path


def run_number(pg: object) -> int:
    """The session's run counter on the page's end marker (0 before the first page)."""
    return int(pg.evaluate("(document.querySelector('.sk-done') || {dataset: {run: '0'}}).dataset.run"))


def wait_done(pg: object, tag: str | None = None, after: int = 0, timeout: float = WAIT_MS) -> None:
    """Wait until a script run later than `after` has finished page `tag` (any page if None)."""
    want = "" if tag is None else f" && m.dataset.page === {tag!r}"
    pg.wait_for_function(f"(() => {{ const m = document.querySelector('.sk-done'); "
                         f"return m && Number(m.dataset.run) > {after}{want}; }})()", timeout=timeout)


def test_browse_search_open_and_live_text(page, server, llama_run):  # noqa: F811
    from features.layout import store_in
    from features.store import FeatureStore

    with FeatureStore.open(store_in(llama_run / "saes" / "tiny-topk")) as store:
        tagged = store.find_tags(value="Europe", kind="feature")[0].index
    pg = page

    # 1. overview
    pg.goto(f"{server}/?page=overview")
    wait_done(pg, "overview")
    assert "Overview · tiny-topk" in pg.inner_text("h1")
    assert pg.locator("[data-testid=stMetricValue]").first.inner_text() == "4.0"
    pg.wait_for_selector("[data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg")
    shot(pg, "01-overview")

    # 2. search for the tagged feature, open it by clicking its row
    pg.goto(f"{server}/?page=list")
    wait_done(pg, "list")
    box = pg.get_by_label("Search label, concept or token")
    box.fill("Europe")
    before = run_number(pg)
    box.press("Enter")
    wait_done(pg, "list", after=before)
    assert "1 feature matches" in pg.inner_text("[data-testid=stMain]")
    shot(pg, "02-search")
    # the grid draws on a canvas; its accessibility table says when the new row is in place
    pg.wait_for_function("(() => { const c = document.querySelector('[data-testid=stDataFrame] "
                         f"[data-testid=glide-cell-1-0]'); return c && c.textContent === '{tagged}'; }})()")
    grid = pg.locator("[data-testid=stDataFrame]").first.bounding_box()
    for _ in range(3):  # a click that lands while the grid is still laying out is dropped: click again
        before = run_number(pg)
        pg.mouse.click(grid["x"] + 18, grid["y"] + 35 + 17)  # the first row's selection box, below the header
        try:
            wait_done(pg, f"feature-{tagged}", after=before, timeout=20_000)
            break
        except PlaywrightTimeout:
            continue
    else:
        pytest.fail("clicking the search result's row did not open its page")

    # 3. the feature page: highlighted examples with values on hover, tags with their scores
    assert pg.inner_text("h1") == f"Feature {tagged}"
    highlighted = pg.locator(".sk-ex .sk-t[style*='background']")
    assert highlighted.count() >= 10
    focus = pg.locator(".sk-ex .sk-f").first
    assert ": " in focus.get_attribute("title")
    tags = pg.locator("table.sk-rel", has_text="continent")
    assert "Europe" in tags.inner_text() and "France" in tags.inner_text() and "0.930" in tags.inner_text()
    shot(pg, "03-feature")

    # 4. a related unit's link leads to its page
    link = pg.locator("table.sk-rel a").first
    kind, idx = link.get_attribute("href").removeprefix("?page=").split("&id=")
    link.click()
    wait_done(pg, f"{kind}-{idx}")

    # 5. live text: highlighted tokens and the features table; click through to a feature
    pg.goto(f"{server}/?page=live")
    wait_done(pg, "live")
    pg.get_by_role("textbox", name="Text").fill("Paris is the capital of France. Tokyo is the capital of Japan.")
    before = run_number(pg)
    pg.get_by_role("button", name="Run").click()
    wait_done(pg, "live", after=before)
    pg.wait_for_selector("text=Strongest feature per token")
    assert pg.locator(".sk-ex .sk-t[style*='background']").count() >= 5
    assert "Paris" in pg.locator(".sk-ex").first.inner_text()
    shot(pg, "04-live-text")
    link = pg.locator("a", has_text="open feature").first
    target = link.get_attribute("href").split("id=")[-1]
    link.click()
    wait_done(pg, f"feature-{target}")

    # 6. steering: continuations with and without the feature
    pg.goto(f"{server}/?page=steer&id={tagged}")
    wait_done(pg, "steer")
    before = run_number(pg)
    pg.get_by_role("button", name="Generate").click()
    wait_done(pg, "steer", after=before)
    pg.wait_for_selector("text=Without steering")
    shot(pg, "05-steering")

    # 7. the compare view
    pg.goto(f"{server}/?page=compare&kind=neuron&id=2")
    wait_done(pg, "compare-neuron-2")
    assert pg.locator("text=Neuron 2 beside the features that explain it").count() == 1
    shot(pg, "06-compare")
    print(f"screenshots in {SHOTS}")
