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


def cells(page: Page):
    return page.locator("#cells > .cell")


def sources(server, did: str) -> list[str]:
    return [m.source for m in stored(server, did).messages]


def test_esc_in_the_answer_editor_saves(page: Page, server) -> None:
    did, (pid,) = seed(server, "answers", [("prompt", "Say hi")])
    svc = DialogueService(server.db)
    svc.edit(did, pid, base_version=None, response="Old answer")
    svc.close()
    page.goto(f"{server.url}/d/{did}")
    page.locator(f"#m-{pid} [data-act=edit-answer]").click()
    editor = page.locator(f"#m-{pid} .answer-edit .CodeMirror")
    expect(editor).to_be_visible()
    page.keyboard.press("Control+a")
    page.keyboard.type("New answer, edited")
    page.keyboard.press("Escape")
    expect(page.locator(f"#m-{pid} .answer-edit .CodeMirror")).to_have_count(0)
    expect(page.locator(f"#m-{pid} .answer")).to_contain_text("New answer, edited")
    assert stored(server, did).messages[0].response == "New answer, edited"
    # unchanged: Esc just closes, writing no version
    v = stored(server, did).messages[0].version
    page.locator(f"#m-{pid} [data-act=edit-answer]").click()
    expect(page.locator(f"#m-{pid} .answer-edit .CodeMirror")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator(f"#m-{pid} .answer-edit .CodeMirror")).to_have_count(0)
    assert stored(server, did).messages[0].version == v
    check_clean(page, server)


def test_jupyter_cell_keys(page: Page, server) -> None:
    did, (a, b) = seed(server, "keys", [("code", "a = 1"), ("code", "b = 2")])
    page.goto(f"{server.url}/d/{did}#m-{a}")
    expect(page.locator(f"#m-{a}")).to_have_class(re.compile(r"\bselected\b"))
    # c copies, v pastes below (selecting the copy), x cuts it to the trash, Shift+V pastes above
    page.keyboard.press("c")
    expect(page.locator("#toast")).to_contain_text("Copied")
    page.keyboard.press("v")
    expect(cells(page)).to_have_count(3)
    assert sources(server, did) == ["a = 1", "a = 1", "b = 2"]
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bselected\b"))
    page.keyboard.press("x")
    expect(cells(page)).to_have_count(2)
    assert sources(server, did) == ["a = 1", "b = 2"]
    page.keyboard.press("Shift+V")
    expect(cells(page)).to_have_count(3)
    assert sources(server, did) == ["a = 1", "a = 1", "b = 2"]
    # m makes a note (markdown), y code again
    page.keyboard.press("m")
    expect(cells(page).nth(1)).to_have_attribute("data-kind", "note")
    page.keyboard.press("y")
    expect(cells(page).nth(1)).to_have_attribute("data-kind", "code")
    # Shift+M merges the selected cell with the one below
    page.keyboard.press("Shift+M")
    expect(cells(page)).to_have_count(2)
    assert sources(server, did) == ["a = 1", "a = 1\nb = 2"]
    # split at the cursor: Ctrl+Shift+Minus in the editor
    page.keyboard.press("Enter")
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.press("Control+End")
    page.keyboard.press("Home")
    page.keyboard.press("Control+Shift+Minus")
    expect(cells(page)).to_have_count(3)
    assert sources(server, did) == ["a = 1", "a = 1", "b = 2"]
    expect(cells(page).nth(2)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.press("Escape")
    # s: Jupyter's save; ours says there is nothing to do
    page.keyboard.press("s")
    expect(page.locator("#toast")).to_contain_text("every change is stored")
    # Alt+Enter runs and adds a code cell below, in its editor
    page.keyboard.press("Alt+Enter")
    expect(cells(page)).to_have_count(4)
    expect(cells(page).nth(3)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("import time; time.sleep(60)")
    page.keyboard.press("Control+Enter")
    expect(cells(page).nth(3).locator(".result.running")).to_have_count(1, timeout=60_000)
    # i i interrupts (Jupyter's meaning); Shift+I pins
    page.keyboard.press("i")
    page.keyboard.press("i")
    expect(cells(page).nth(3).locator(".result.running")).to_have_count(0, timeout=30_000)
    expect(cells(page).nth(3)).to_contain_text("interrupted")
    page.keyboard.press("Shift+I")
    expect(cells(page).nth(3)).to_have_class(re.compile(r"\bis-pinned\b"))
    assert stored(server, did).messages[3].pinned
    check_clean(page, server)


def test_history_panel_shows_steps_with_a_diff_and_restores(page: Page, server) -> None:
    did, (mid,) = seed(server, "history", [("code", "total = sum(range(10))\ntotal")])
    svc = DialogueService(server.db)
    svc.store.begin_stream(mid)
    svc.store.finish_stream(mid, outputs=[{"output_type": "stream", "name": "stdout",
                                           "text": "forty-five\n"}], meta={"run": {"status": "ok"}})
    svc.edit(did, mid, base_version=None, source="total = sum(range(10))\n  total")
    svc.store.begin_stream(mid)
    svc.store.finish_stream(mid, outputs=[{"output_type": "error", "ename": "IndentationError",
                                           "evalue": "unexpected indent", "traceback": []}],
                            meta={"run": {"status": "error"}})
    svc.close()
    page.goto(f"{server.url}/d/{did}#m-{mid}")
    cell = page.locator(f"#m-{mid}")
    expect(cell).to_contain_text("IndentationError")
    cell.locator(".view").hover()
    cell.locator("details.cell-menu summary, .cell-menu summary").first.click()
    cell.locator("[data-act=history]").click()
    modal = page.locator("dialog#history")
    expect(modal).to_be_visible()
    expect(modal.locator(".hist-item")).to_have_count(2)
    expect(modal.locator(".hist-item").first.locator(".diff-add")).to_have_text("+  total")
    expect(modal.locator(".hist-item").first.locator(".diff-del")).to_have_text("-total")
    modal.locator("[data-act=restore-version]").click()
    expect(modal).to_have_count(0)
    expect(cell).to_contain_text("forty-five")
    expect(cell).not_to_contain_text("IndentationError")
    assert stored(server, did).messages[0].source == "total = sum(range(10))\ntotal"
    check_clean(page, server)


@pytest.mark.parametrize("width", [1280, 1024])
def test_header_fits_with_a_long_name_and_grown_counters(page: Page, server, width) -> None:
    name = "A rather long dialogue name about quarterly revenue forecasting " + str(width)
    did, (pid,) = seed(server, name, [("prompt", "q")])
    svc = DialogueService(server.db)
    svc.edit(did, pid, base_version=None, response="a",
             usage={"input": 123_456_789, "output": 98_765_432, "cache_read": 1_234_567,
                    "cost": 1234.56, "model": "local:default"})
    svc.close()
    page.set_viewport_size({"width": width, "height": 800})
    page.goto(f"{server.url}/d/{did}")
    expect(page.locator("#totals")).to_contain_text("98,765,432 out")
    # nothing of the header lies beyond the window, and the page does not scroll sideways
    overflow = page.evaluate("""() => {
        const w = document.documentElement.clientWidth;
        return [...document.querySelectorAll('.topbar *')]
          .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > w + 1)
          .map(e => e.outerHTML.slice(0, 80));
    }""")
    assert overflow == []
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    # the whole name shows: the title's box is as wide as its text
    title = page.locator(".title-input")
    assert title.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), "the name is cut"
    assert title.get_attribute("title") == name
