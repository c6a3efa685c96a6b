"""End-to-end in a real browser: Playwright (sync API) driving Debian's chromium.

Analyse (upload, form, result), a batch with a broken file, History (open a row, record its
confirmed diagnosis), Agreement and About, at desktop width and at phone width (390 px). A
screenshot of each tab is saved under
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
from app.ui.analyse import EXAMPLES_DIR
from app.ui.demo import build_demo as make_frontend
from data_pipeline.request import PredictionRequest
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


def _serve(tiny_checkpoint, tmp_path_factory):
    save = os.environ.get(SCREENSHOT_ENV) == "1"
    checkpoint = SHIPPED_DIR if save and (SHIPPED_DIR / CONFIG_FILE).is_file() else tiny_checkpoint
    db = tmp_path_factory.mktemp("browserdb") / "history.db"
    service = PredictionService.create(checkpoint, db_url=f"sqlite:///{db}")
    demo = make_frontend(service)
    # served from another working directory, as a user or the container starts it: Gradio
    # allows files under the working directory, which would hide a path the app forgot to allow
    here = Path.cwd()
    os.chdir(db.parent)
    try:
        url = launch(demo, port=free_port(), quiet=True).local_url
        yield service, url
    finally:
        os.chdir(here)
        demo.close()
        service.close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    yield from _serve(tiny_checkpoint, tmp_path_factory)


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


def _open_tab(page, name: str) -> None:
    """Click a tab; at phone width the last tabs sit in Gradio's "More tabs" menu."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.get_by_label("More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).click()


def _no_sideways_scroll(page, width: int) -> None:
    """Nothing is cut off: the page is no wider than the viewport."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width + 2


def _uploaded(page, name: str) -> None:
    """Wait until the Batch tab's file list shows ``name`` (the upload is done: pressing
    Analyse batch earlier would send no files on a slow machine)."""
    # Gradio may draw a long name as stem + extension in two spans, so match the row's label
    page.locator(f'#batch-files [aria-label*="{name}"]').first.wait_for()
    page.wait_for_timeout(300)


def _analyse(page, image: Path, age: str, sex: str, site: str) -> int:
    page.locator("input[type=file]").first.set_input_files(str(image))
    page.get_by_label("Age (years, optional)").fill(age)
    _choose(page, "Sex", sex)
    _choose(page, "Body site", site)
    page.get_by_role("button", name="Analyse", exact=True).click()
    info = page.locator("#result-info")
    info.get_by_text(re.compile(r"saved to history as #\d+")).wait_for()
    return int(re.search(r"#(\d+)", info.inner_text()).group(1))


def test_analyse_batch_history_agreement_about_in_a_real_browser(browser, served, tmp_path, capfd):
    service, url = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.get_by_role("button", name="Analyse", exact=True).wait_for()
    assert page.get_by_text("Research and education only — not a diagnosis.").first.is_visible()
    assert page.get_by_role("tab", name="Analyse").is_visible()
    assert page.get_by_role("tab", name="Diagnose").count() == 0

    # An empty submission is refused with a clear message, not a traceback.
    page.get_by_role("button", name="Analyse", exact=True).click()
    page.get_by_text("No image was submitted").first.wait_for()
    assert "Traceback" not in page.content()
    assert service.count() == 0
    page.reload()  # drop the error toast so it does not cover the screenshots
    page.get_by_role("button", name="Analyse", exact=True).wait_for()

    # A non-image is flagged on upload, before Analyse is pressed.
    junk = tmp_path / "notes.jpg"
    junk.write_text("this is not an image")
    page.locator("input[type=file]").first.set_input_files(str(junk))
    page.get_by_text("notes.jpg: not an image file").first.wait_for()
    page.reload()
    page.get_by_role("button", name="Analyse", exact=True).wait_for()

    # An example from the gallery fills the form (image, age, sex, site).
    page.locator("#examples .thumbnail-item").nth(2).click()
    page.locator("#input-image img").first.wait_for()
    assert page.get_by_label("Age (years, optional)").input_value() != ""
    assert "Error" not in page.locator("#input-image").inner_text()
    page.reload()
    page.get_by_role("button", name="Analyse", exact=True).wait_for()

    # Analyse: upload, fill the form, submit.
    row_id = _analyse(page, EXAMPLES_DIR / "ISIC_0029281.jpg", "35", "female", "back")
    probabilities = page.locator("#probabilities")
    assert probabilities.locator(".prob-row").count() == len(CLASSES)
    for c in CLASSES:
        assert probabilities.get_by_text(CLASS_NAMES[c], exact=False).first.is_visible()
    heatmap = page.locator("#heatmap img").first
    heatmap.wait_for()
    assert page.evaluate("(img) => img.naturalWidth", heatmap.element_handle()) > 200
    assert page.locator("#contributions img").first.is_visible()
    assert "not a diagnosis" in page.locator("#alerts").inner_text()
    assert service.count() == 1
    record = service.get(row_id)
    assert (record.age, record.sex, record.site) == (35.0, "female", "back")
    page.wait_for_timeout(500)  # let the result images finish painting for the screenshot
    _save(page, tmp_path, "analyse.png")

    # Batch: three example images and one broken file.
    page.get_by_role("tab", name="Batch").click()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    batch = [EXAMPLES_DIR / n for n in ("ISIC_0028211.jpg", "ISIC_0029448.jpg", "ISIC_0030877.jpg")]
    page.locator("#batch-files input[type=file]").set_input_files([*map(str, batch), str(broken)])
    _uploaded(page, "broken.jpg")
    page.get_by_role("button", name="Analyse batch").click()
    summary = page.locator("#batch-summary")
    summary.get_by_text("3 images analysed and stored").wait_for()
    assert "1 file could not be analysed" in summary.inner_text()
    assert "broken.jpg" in page.locator("#batch-table").inner_text()
    assert service.count() == 4
    page.wait_for_timeout(500)
    _save(page, tmp_path, "batch.png")

    # History: the tab refreshes itself; open the row, record its confirmed diagnosis.
    page.get_by_role("tab", name="History").click()
    table = page.locator("#history-table")
    cell = table.get_by_role("gridcell", name=str(row_id), exact=True).first
    cell.wait_for()
    assert "female" in table.inner_text() and "back" in table.inner_text()
    assert "4 matching predictions" in page.locator("#history-summary").inner_text()
    cell.click()
    detail = page.locator("#history-detail")
    detail.get_by_text(f"Prediction #{row_id}").wait_for()
    assert "age 35" in detail.inner_text() and "body site back" in detail.inner_text()
    # the form and buttons are loaded just after the detail: a dropdown opened before that
    # would be redrawn (and closed) by it
    expect = pytest.importorskip("playwright.sync_api").expect
    record_btn = page.get_by_role("button", name="Record confirmed diagnosis", exact=True)
    expect(record_btn).to_be_enabled(timeout=WAIT_MS)
    _choose(page, "Confirmed diagnosis", "Melanoma (mel)")
    _choose(page, "Confirmed by", "histopathology")
    record_btn.click()
    page.locator("#history-status").get_by_text("recorded").wait_for()
    assert service.get(row_id).confirmed_dx == "mel"
    detail.get_by_text("Confirmed diagnosis").wait_for()
    page.wait_for_timeout(500)
    _save(page, tmp_path, "history.png")
    # a page number below 1 shows the newest page (no server error); the box then says 1
    box = page.locator("#history-page input")
    box.fill("-3")
    box.press("Enter")
    expect(box).to_have_value("1", timeout=WAIT_MS)

    # Agreement: the confirmed label counts.
    page.get_by_role("tab", name="Agreement").click()
    agreement = page.locator("#agreement-summary")
    agreement.get_by_text("1 of 4 predictions has a confirmed diagnosis").wait_for()
    page.wait_for_timeout(300)
    _save(page, tmp_path, "agreement.png")

    # About: the model card and (for the shipped model) its evaluation plots.
    page.get_by_role("tab", name="About").click()
    card = page.locator("#model-card")
    card.get_by_text("Model card").first.wait_for()
    text = card.inner_text()
    assert "HAM10000" in text and "Limitations" in text and "not a diagnosis" in text
    page.wait_for_timeout(500)
    _save(page, tmp_path, "about.png")
    page.close()

    # Phone width (390 px): every tab fits, nothing needs sideways scrolling.
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    phone.set_default_timeout(WAIT_MS)
    phone.goto(url)
    phone.get_by_role("button", name="Analyse", exact=True).wait_for()
    _analyse(phone, EXAMPLES_DIR / "ISIC_0028211.jpg", "65", "male", "face")
    phone.locator("#heatmap img").first.wait_for()
    phone.wait_for_timeout(500)
    _no_sideways_scroll(phone, 390)
    _save(phone, tmp_path, "phone_analyse.png")
    for tab, ready, name in [
        ("History", "#history-summary", "phone_history.png"),
        ("Agreement", "#agreement-summary", "phone_agreement.png"),
        ("About", "#model-card", "phone_about.png"),
    ]:
        _open_tab(phone, tab)
        phone.locator(ready).get_by_text(re.compile(r"\w")).first.wait_for()
        phone.wait_for_timeout(500)
        _no_sideways_scroll(phone, 390)
        _save(phone, tmp_path, name)
    phone.close()
    _no_server_errors(capfd)


#: A note as a lab book might hold it: a formula, a link, dollar signs, a LaTeX fraction, an email.
NOTE = r'excised, see lab 12: =HYPERLINK("http://x","click") $5 then $10; $$\frac{1}{2}$$ a@b.org'


def _no_server_errors(capfd) -> None:
    """No handler failed on the server while the page was used (the app thread shares this
    process, so its stderr is captured): a refused input is a titled message, never a traceback,
    and a handler returning the wrong outputs shows up here though the page may look fine."""
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]


def _type_choice(page, label: str, text: str) -> None:
    """Type ``text`` into the Gradio dropdown labelled ``label`` and press Enter, as a person
    who knows the option's name does."""
    box = page.get_by_label(label, exact=True).first
    box.click()
    box.fill("")
    box.press_sequentially(text)
    box.press("Enter")


def test_records_forms_dropdowns_and_delete_in_a_real_browser(browser, served, tmp_path, capfd):
    """Issue 24: what the app stores is what the user saw and meant, and a delete says what it
    removes. Exact dropdown matches win, a typed value matching nothing is refused, an error
    clears the previous result, re-explaining keeps the saved id, each opened record shows its
    own confirmation (never the previous record's), an empty form is refused, a batch file
    name is text."""
    expect = pytest.importorskip("playwright.sync_api").expect
    service, url = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.get_by_role("button", name="Analyse", exact=True).wait_for()

    # "male" + Enter is male (Gradio's own Enter would take "female", the first match)
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLES_DIR / "ISIC_0029281.jpg"))
    page.get_by_label("Age (years, optional)").fill("52")
    _type_choice(page, "Sex", "male")
    _type_choice(page, "Body site", "back")
    assert page.get_by_label("Sex", exact=True).first.input_value() == "male"
    page.get_by_role("button", name="Analyse", exact=True).click()
    info = page.locator("#result-info")
    info.get_by_text(re.compile(r"saved to history as #\d+")).wait_for()
    first = int(re.search(r"#(\d+)", info.inner_text()).group(1))
    assert (service.get(first).sex, service.get(first).site) == ("male", "back")

    # another class explained: the result still says where it is saved
    _choose(page, "Class to explain (heatmap and metadata chart)", "Melanoma (mel)")
    info.get_by_text("now explain").wait_for()
    assert f"saved to history as #{first}" in info.inner_text()

    # another image uploaded: the first one's result (and its case report) is gone at once
    assert page.locator("#probabilities .prob-row").count() == len(CLASSES)
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLES_DIR / "ISIC_0028211.jpg"))
    expect(page.locator("#probabilities .prob-row")).to_have_count(0, timeout=WAIT_MS)
    assert "saved to history" not in info.inner_text()

    # a typed value matching no option is refused with its message; no result is shown
    count = service.count()
    _type_choice(page, "Sex", "mail")
    page.get_by_role("button", name="Analyse", exact=True).click()
    page.get_by_text("Unknown sex").first.wait_for()
    assert service.count() == count
    assert page.locator("#probabilities .prob-row").count() == 0
    assert "saved to history" not in info.inner_text()

    # History: a second record; each opened record shows its own confirmation
    second = service.predict_and_store(
        PredictionRequest.build(EXAMPLES_DIR / "ISIC_0028211.jpg", 60, "female", "face")
    ).id
    page.reload()
    page.get_by_role("button", name="Analyse", exact=True).wait_for()
    page.get_by_role("tab", name="History").click()
    table = page.locator("#history-table")
    table.get_by_role("gridcell", name=str(second), exact=True).first.wait_for()
    record_btn = page.get_by_role("button", name="Record confirmed diagnosis", exact=True)
    assert record_btn.is_disabled()  # nothing open yet: nothing to record
    pick = page.get_by_label("Prediction id")
    detail = page.locator("#history-detail")
    dx = page.get_by_label("Confirmed diagnosis", exact=True).first
    source = page.get_by_label("Confirmed by", exact=True).first
    note = page.get_by_label("Note (optional)")

    def open_by_id(pid: int) -> None:
        pick.fill(str(pid))
        pick.press("Enter")
        detail.get_by_text(f"Prediction #{pid}").wait_for()
        expect(record_btn).to_be_enabled(timeout=WAIT_MS)  # the form is loaded with the actions

    open_by_id(first)
    assert dx.input_value() == "" and note.input_value() == ""
    _type_choice(page, "Confirmed diagnosis", "mel")  # the code in brackets counts as exact
    _choose(page, "Confirmed by", "histopathology")
    note.fill(NOTE)
    record_btn.click()
    page.locator("#history-status").get_by_text("recorded").wait_for()
    stored = service.get(first)
    assert (stored.confirmed_dx, stored.confirmed_note) == ("mel", NOTE)
    # the note is shown as typed: no link, no math, no stray backslash
    detail.get_by_text("Confirmed diagnosis").wait_for()
    assert NOTE in detail.inner_text() and detail.locator("a").count() == 0

    # a click on the other row: its (empty) confirmation, not the first one's
    table.get_by_role("gridcell", name=str(second), exact=True).first.click()
    detail.get_by_text(f"Prediction #{second}").wait_for()
    expect(note).to_have_value("", timeout=WAIT_MS)
    assert dx.input_value() == "" and source.input_value() == ""
    record_btn.click()  # nothing chosen: refused, nothing stored
    page.get_by_text("Choose the confirmed diagnosis").first.wait_for()
    assert service.get(second).confirmed_dx is None

    # back to the first: its stored confirmation is shown
    open_by_id(first)
    expect(note).to_have_value(NOTE, timeout=WAIT_MS)
    assert dx.input_value() == "Melanoma (mel)" and source.input_value() == "histopathology"
    assert note.input_value() == NOTE
    # another id put in the box without typing (pasted with the mouse, autofill): the first
    # record's detail and form close, nothing can be sent for the id in the box
    pick.fill(str(second))
    expect(record_btn).to_be_disabled(timeout=WAIT_MS)
    expect(note).to_have_value("", timeout=WAIT_MS)
    assert detail.inner_text().strip() == ""
    assert service.get(second).confirmed_dx is None
    # typing another id: the same
    open_by_id(first)
    pick.press("End")
    pick.press_sequentially("9")
    expect(record_btn).to_be_disabled(timeout=WAIT_MS)
    assert note.input_value() == "" and detail.inner_text().strip() == ""
    # id + Enter, again and again: each opens and stays open (Gradio's Textbox also sends an
    # "input" event after Enter, which once raced the opening and closed it now and then)
    for pid in (first, second) * 5:
        open_by_id(pid)
        page.wait_for_timeout(150)
        assert f"Prediction #{pid}" in detail.inner_text()

    # delete (the loop left the second record open): the dialog says exactly what goes
    expect(record_btn).to_be_enabled(timeout=WAIT_MS)
    page.get_by_role("button", name="Delete this prediction…").click()
    dialog = page.locator("#delete-dialog")
    dialog.get_by_text(f"Delete prediction #{second} for good?").wait_for()
    text = dialog.inner_text()
    assert "uploaded original" in text and "case-report PDFs" in text and "backups" in text
    page.get_by_role("button", name="Yes, delete it").click()
    page.locator("#history-status").get_by_text(f"#{second} was deleted").wait_for()
    assert service.get(second) is None
    expect(record_btn).to_be_disabled(timeout=WAIT_MS)

    # a batch file name with markup is shown as text
    name = "x](javascript:alert(1)) <img src=x onerror=alert(1)>.jpg"
    odd = tmp_path / name
    shutil.copy(EXAMPLES_DIR / "ISIC_0029448.jpg", odd)
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files(str(odd))
    _uploaded(page, "onerror")
    page.get_by_role("button", name="Analyse batch").click()
    page.locator("#batch-summary").get_by_text("1 image analysed and stored").wait_for()
    batch_table = page.locator("#batch-table")
    assert batch_table.locator('img[src="x"]').count() == 0
    assert batch_table.locator('a[href^="javascript"]').count() == 0
    assert "onerror=alert(1)" in batch_table.inner_text()  # the name, as text
    page.close()
    _no_server_errors(capfd)
