"""The web page in a real browser (Debian's Chromium driven by Playwright; nothing downloaded)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


def test_page_classifies_an_upload_and_reports_errors(make_stack, browser, tmp_path):
    stack = make_stack(workers=1)
    photo = tmp_path / "red.jpg"
    photo.write_bytes(jpeg((220, 40, 40), size=(640, 480)))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")

    page = browser.new_page()
    page.goto(stack.base + "/")
    # The model in tests is random-init: the page must say so before anything is submitted.
    page.wait_for_selector("#warning", state="visible")
    assert "NOT built from the official" in page.inner_text("#warning")

    page.select_option("#topk", "3")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    rows = page.query_selector_all("#results tbody tr")
    assert len(rows) == 3
    assert all(r.inner_text().strip() for r in rows)
    assert "NOT pretrained" in page.inner_text("#meta")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.querySelector('#error').textContent.length > 0", timeout=30_000)
    assert "unsupported_format" in page.inner_text("#error")
    assert page.is_hidden("#results")
