"""End-to-end in a real browser: Playwright (sync API) driving Debian's chromium.

Uploads an image, fills the form, submits, checks probabilities / heatmap / stored row, opens the
History tab and the stored prediction, and the About tab. A screenshot of each tab is saved under
the test's tmp_path and, with ``DERMFUSION_SAVE_SCREENSHOTS=1``, copied to ``docs/screenshots/``
(then the shipped model is used when present, so the README shows real predictions).

Skipped with a reason when chromium or the playwright package is missing
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from app.__main__ import launch
from app.frontend import EXAMPLES_DIR, make_frontend
from data_pipeline.schema import CLASS_NAMES, CLASSES
from model.checkpoint import CONFIG_FILE, SHIPPED_DIR
from service.prediction import PredictionService

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT_ENV = "DERMFUSION_SAVE_SCREENSHOTS"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Generous upper bound for one prediction on a loaded 2-core CI machine (not a speed assertion).
WAIT_MS = 120_000


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    save = os.environ.get(SCREENSHOT_ENV) == "1"
    checkpoint = SHIPPED_DIR if save and (SHIPPED_DIR / CONFIG_FILE).is_file() else tiny_checkpoint
    db = tmp_path_factory.mktemp("browserdb") / "history.db"
    service = PredictionService.create(checkpoint, db_url=f"sqlite:///{db}")
    demo = make_frontend(service)
    url = launch(demo, port=free_port(), quiet=True).local_url
    yield service, url
    demo.close()
    service.close()


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the Gradio dropdown labelled ``label``."""
    page.get_by_label(label, exact=True).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _save(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV) == "1":
        docs = REPO / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, docs / name)
    return out


def test_diagnose_history_about_in_a_real_browser(browser, served, tmp_path):
    service, url = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.get_by_role("button", name="Analyse").wait_for()
    assert page.get_by_text("Research and education only — not a diagnosis.").first.is_visible()

    # An empty submission is refused with a clear message, not a traceback.
    page.get_by_role("button", name="Analyse").click()
    toast = page.get_by_text("No image was submitted").first
    toast.wait_for()
    assert "Traceback" not in page.content()
    assert service.count() == 0
    page.reload()  # drop the error toast so it does not cover the screenshots
    page.get_by_role("button", name="Analyse").wait_for()

    # Upload, fill the form, submit.
    image = EXAMPLES_DIR / "ISIC_0029281.jpg"
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.get_by_label("Age (years, optional)").fill("35")
    _choose(page, "Sex", "female")
    _choose(page, "Body site", "back")
    page.get_by_role("button", name="Analyse").click()

    info = page.locator("#result-info")
    info.get_by_text(re.compile(r"saved to history as #\d+")).wait_for()
    row_id = int(re.search(r"#(\d+)", info.inner_text()).group(1))

    probabilities = page.locator("#probabilities")
    for c in CLASSES:
        assert probabilities.get_by_text(CLASS_NAMES[c], exact=False).first.is_visible()
    assert re.search(r"\d+%", probabilities.inner_text())
    heatmap = page.locator("#heatmap img").first
    heatmap.wait_for()
    assert page.evaluate("(img) => img.naturalWidth", heatmap.element_handle()) > 32
    assert page.locator("#contributions img").first.is_visible()
    assert "not a diagnosis" in page.locator("#alerts").inner_text()

    # What the browser submitted is what was stored.
    assert service.count() == 1
    record = service.get(row_id)
    assert (record.age, record.sex, record.site) == (35.0, "female", "back")
    page.wait_for_timeout(500)  # let the result images finish painting for the screenshot
    _save(page, tmp_path, "diagnose.png")

    # History: the tab refreshes itself; the row is there and opens on click.
    page.get_by_role("tab", name="History").click()
    table = page.locator("#history-table")
    cell = table.get_by_role("gridcell", name=str(row_id), exact=True).first
    cell.wait_for()
    assert "female" in table.inner_text() and "back" in table.inner_text()
    assert "1" in page.locator("#history-summary").inner_text()
    cell.click()
    detail = page.locator("#history-detail")
    detail.get_by_text(f"Prediction #{row_id}").wait_for()
    assert "age 35" in detail.inner_text() and "body site back" in detail.inner_text()
    page.wait_for_timeout(500)
    _save(page, tmp_path, "history.png")

    # About: the model card, which renders without metrics for the tiny checkpoint.
    page.get_by_role("tab", name="About").click()
    card = page.locator("#model-card")
    card.get_by_text("Model card").first.wait_for()
    text = card.inner_text()
    assert "HAM10000" in text and "Limitations" in text and "not a diagnosis" in text
    _save(page, tmp_path, "about.png")
    page.close()
