"""Numbers as pictures in a real browser: the header's chart of tokens and cost opens over the
page, the training and cache pages render their SVG inline under the app's CSP with nothing
fetched from elsewhere, and an import opens its progress box and stream while it runs."""
from __future__ import annotations

import json

import nbformat
import pytest
from playwright.sync_api import Page, expect

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]


def check_clean(page: Page, server) -> None:
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def test_the_header_chart_opens_over_the_page(page: Page, server, tmp_path) -> None:
    svc = DialogueService(server.db)
    try:
        d = svc.create("charted")
        for i in range(1, 6):
            svc.add(d.id, "prompt", f"q{i}?", response="A.",
                    usage={"input": 100 * i, "output": 10 * i, "cost": None if i == 3 else 0.001 * i})
    finally:
        svc.close()
    page.goto(f"{server.url}/d/{d.id}")
    chart = page.locator("#totals .usage-chart svg")
    expect(chart).to_be_hidden()
    page.click("#totals .usage-chart summary")
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box and box["width"] > 300 and box["x"] >= 0 and box["x"] + box["width"] <= 1280
    expect(page.locator("#totals .usage-chart")).to_contain_text("cost not known for 1 of 5 answers")
    check_clean(page, server)


def test_training_and_cache_pages_render_inline(page: Page, server, tmp_path) -> None:
    page.goto(f"{server.url}/training")
    expect(page.locator("main")).to_contain_text("Training runs")
    page.click("text=Cache")
    expect(page.locator("#cache-facts")).to_contain_text("hit rate")
    check_clean(page, server)


def test_an_import_opens_its_progress_stream(page: Page, server, tmp_path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {i}\n" * 20) for i in range(3000)])
    path = tmp_path / "large.ipynb"
    path.write_text(nbformat.writes(nb))
    page.goto(server.url)
    page.set_input_files("#import-form input[type=file]", str(path))
    with page.expect_navigation(url=lambda u: "/d/" in u, timeout=120_000):
        page.click("#import-form button[type=submit]")
    asked = [u for u in page.watch.requests if "/progress/" in u]
    assert any(u.endswith("/stream") for u in asked) and any(not u.endswith("/stream") for u in asked), asked
    expect(page.locator(".cell")).to_have_count(3000, timeout=60_000)
    check_clean(page, server)
