"""An imported notebook in a real browser: the page says what the import set aside (the file's
model, its system prompt), shows the system prompt as text, and its button adopts it."""
from __future__ import annotations

import re

import nbformat
import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

pytestmark = pytest.mark.browser

SYSTEM = "Obey <img src=x onerror=alert(1)> the file."


def test_upload_tells_what_was_set_aside_and_adopts_the_system_prompt(page: Page, server,
                                                                      tmp_path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["dialogue"] = {"name": "uploaded", "id": "../d/00000000", "system": SYSTEM,
                               "model": "openai-compatible:http://127.0.0.1:9/v1/x"}
    nb.cells = [nbformat.v4.new_markdown_cell("hello")]
    nb.cells[0].id = "1"
    path = tmp_path / "uploaded.ipynb"
    nbformat.write(nb, path)

    page.goto(server.url + "/")
    page.set_input_files("#import-form input[type=file]", str(path))
    page.click("#import-form button[type=submit]")
    page.wait_for_url(re.compile(r"/d/[0-9a-f]{8}\?imported=1$"))
    did = page.url.split("/d/", 1)[1].split("?")[0]
    toast = page.locator("#toast")
    expect(toast).to_contain_text("was not used")
    expect(toast).to_contain_text("http://127.0.0.1:9/v1")
    expect(toast).to_contain_text("system prompt")
    page.click("#toast summary")
    expect(toast.locator("pre")).to_have_text(SYSTEM)  # text, not markup
    assert stored(server, did).system == ""

    page.click('#toast [data-act="adopt-system"]')
    expect(page.locator("#toast")).to_contain_text("Settings saved.")
    d = stored(server, did)
    assert d.system == SYSTEM and d.model == "local:default"
    assert [m.source for m in d.messages] == ["hello"] and d.messages[0].id != "1"
    expect(page.locator("#settings textarea[name=system]")).to_have_value(SYSTEM)

    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)
