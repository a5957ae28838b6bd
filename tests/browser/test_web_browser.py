"""The web app in a real browser: craft a dialogue with the mouse and the keyboard, with a real
kernel and the bundled local model answering, against a real server process.

Each test checks at the end that the page logged no console error and requested nothing outside
the server's own origin (every asset is vendored; nothing may come from a CDN).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL_TIMEOUT = 180_000  # ms: the first prompt loads the model on a busy 2-core machine


def new_dialogue(page: Page, server, name: str) -> str:
    page.goto(server.url + "/")
    page.fill("#new-form input[name=name]", name)
    page.press("#new-form input[name=name]", "Enter")
    page.wait_for_url(re.compile(r"/d/[0-9a-f]+$"))  # waits for "load": deferred scripts ran
    return page.url.rsplit("/", 1)[1]


def cells(page: Page):
    return page.locator("#cells > .cell")


def ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#cells > .cell", "els => els.map(e => e.dataset.id)")


def check_clean(page: Page, server) -> None:
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def watch_stream(page: Page, cell, timeout_s: float) -> list[int]:
    """Lengths of the streaming answer, sampled until the run is over."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cell.locator(".result.running").count() == 0:
            break
        texts = cell.locator(".answer.streaming").all_inner_texts()  # no waiting: it may be gone
        if texts:
            n = len(texts[0])
            if not seen or seen[-1] != n:
                seen.append(n)
        page.wait_for_timeout(40)
    else:
        raise AssertionError("the answer did not finish in time")
    return seen


def test_craft_a_dialogue(page: Page, server) -> None:
    did = new_dialogue(page, server, "browser demo")

    # b on an empty dialogue adds a code cell, already in edit mode
    page.keyboard.press("b")
    c1 = cells(page).nth(0)
    expect(c1).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("print('hi')")
    page.keyboard.press("Shift+Enter")
    expect(c1.locator(".outputs")).to_have_text("hi", timeout=60_000)
    expect(c1.locator(".kind-tag")).to_have_text("[1]")

    # Shift+Enter on the last cell added one below; make it a prompt and send it
    c2 = cells(page).nth(1)
    expect(c2).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.press("Escape")
    page.keyboard.press("p")
    expect(c2).to_have_attribute("data-kind", "prompt")
    page.keyboard.press("Enter")
    page.keyboard.type("Say hello to Ada in one short sentence.")
    page.keyboard.press("Shift+Enter")
    expect(c2.locator(".result.running")).to_have_count(1)
    grew = watch_stream(page, c2, MODEL_TIMEOUT / 1000)
    assert len(grew) >= 3, f"the answer did not stream in pieces: {grew}"
    answer = c2.locator(".answer.markdown")
    expect(answer).not_to_be_empty()
    expect(c2.locator(".usage")).to_contain_text("local:default")
    assert "$0.0000" in c2.locator(".usage").inner_text()

    # a long answer, stopped mid-way, keeps what was streamed
    c3 = cells(page).nth(2)
    expect(c3).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.press("Escape")
    page.keyboard.press("p")
    expect(c3).to_have_attribute("data-kind", "prompt")
    page.keyboard.press("Enter")
    page.keyboard.type("Write a very long story about a dragon who learns to program.")
    page.keyboard.press("Control+Enter")
    live = c3.locator(".answer.streaming")
    deadline = time.monotonic() + MODEL_TIMEOUT / 1000
    while not any(len(t) > 40 for t in live.all_inner_texts()):
        assert time.monotonic() < deadline, "no answer streamed in"
        page.wait_for_timeout(50)
    if os.environ.get("DIALOGUE_SCREENSHOTS"):  # see test_screenshots
        c3.hover()
        page.screenshot(path=str(Path(os.environ["DIALOGUE_SCREENSHOTS"]) / "streaming.png"))
    c3.locator("[data-act=stop]").click()
    expect(c3.locator(".result.running")).to_have_count(0, timeout=30_000)
    expect(c3.locator(".usage")).to_contain_text("stopped")
    stopped_text = c3.locator(".answer.markdown").inner_text()
    assert len(stopped_text) > 40
    d = stored(server, did)
    assert d.messages[2].usage["stop_reason"] == "cancelled"

    # edit the model's answer in place
    c2.hover()
    c2.locator("[data-act=edit-answer]").click()
    expect(c2.locator(".answer-edit .CodeMirror")).to_be_visible()
    page.keyboard.press("Control+a")
    page.keyboard.type("Hello, **Ada**! (edited)")
    c2.locator("[data-act=save-answer]").click()
    expect(c2.locator(".answer.markdown")).to_have_text("Hello, Ada! (edited)")
    expect(c2.locator(".answer.markdown strong")).to_have_text("Ada")

    # reload: everything is as it was left
    page.reload()
    expect(cells(page)).to_have_count(3)
    expect(cells(page).nth(0).locator(".outputs")).to_have_text("hi")
    expect(cells(page).nth(1).locator(".answer.markdown")).to_have_text("Hello, Ada! (edited)")
    expect(cells(page).nth(2).locator(".answer.markdown")).to_have_text(stopped_text)
    expect(cells(page).nth(2).locator(".usage")).to_contain_text("stopped")
    d = stored(server, did)
    assert [m.kind.value for m in d.messages] == ["code", "prompt", "prompt"]
    assert d.messages[0].source == "print('hi')"
    assert d.messages[1].response == "Hello, **Ada**! (edited)"
    assert d.messages[1].source == "Say hello to Ada in one short sentence."
    check_clean(page, server)


def test_keyboard_add_run_move_delete(page: Page, server) -> None:
    did = new_dialogue(page, server, "keyboard")
    page.keyboard.press("b")
    expect(cells(page).nth(0)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("x = 20")
    page.keyboard.press("Escape")  # saves, back to command mode
    expect(cells(page).nth(0)).not_to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.press("b")  # below the selected cell
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("print(x + 1)")
    page.keyboard.press("Escape")
    page.keyboard.press("k")  # select the first cell
    page.keyboard.press("Control+Enter")  # run in place
    expect(cells(page).nth(0).locator(".kind-tag")).to_have_text("[1]", timeout=60_000)
    page.keyboard.press("j")
    page.keyboard.press("Control+Enter")
    expect(cells(page).nth(1).locator(".outputs")).to_have_text("21", timeout=60_000)

    first, second = ids(page)
    page.keyboard.press("Shift+K")  # move the selected (second) cell up
    expect(cells(page).first).to_have_attribute("data-id", second)
    assert [m.id for m in stored(server, did).messages] == [second, first]
    page.keyboard.press("Shift+J")  # and back down
    expect(cells(page).first).to_have_attribute("data-id", first)
    assert [m.id for m in stored(server, did).messages] == [first, second]

    # a adds above; n makes it a note; h hides it, Shift+I pins it (i i interrupts, as in Jupyter)
    page.keyboard.press("a")
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("# A note")
    page.keyboard.press("Escape")
    page.keyboard.press("n")
    expect(cells(page).nth(1)).to_have_attribute("data-kind", "note")
    expect(cells(page).nth(1).locator(".view h1")).to_have_text("A note")
    page.keyboard.press("h")
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bis-hidden\b"))
    page.keyboard.press("Shift+I")
    expect(cells(page).nth(1)).to_have_class(re.compile(r"\bis-pinned\b"))
    note = stored(server, did).messages[1]
    assert (note.kind.value, note.source, note.hidden, note.pinned) == ("note", "# A note", True, True)

    # d d deletes (to the trash), z brings it back in the same place
    page.keyboard.press("k")
    page.keyboard.press("j")
    note_id = ids(page)[1]
    page.keyboard.press("d")
    page.keyboard.press("d")
    expect(cells(page)).to_have_count(2)
    expect(page.locator("#toast")).to_contain_text("Deleted")
    page.keyboard.press("z")
    expect(cells(page)).to_have_count(3)
    assert ids(page)[1] == note_id
    assert [m.id for m in stored(server, did).messages][1] == note_id

    # ? lists the keys
    page.keyboard.press("?")
    expect(page.locator("dialog#help")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("dialog#help")).not_to_be_visible()

    page.reload()
    assert ids(page) == [m.id for m in stored(server, did).messages]
    check_clean(page, server)


def test_stale_edit_in_two_tabs_is_refused_and_kept(page: Page, server, browser) -> None:
    did = new_dialogue(page, server, "two tabs")
    page.keyboard.press("b")
    expect(cells(page).nth(0)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("a = 1")
    page.keyboard.press("Escape")
    expect(cells(page).nth(0).locator(".view")).to_contain_text("a = 1")

    other = page.context.new_page()
    other.goto(page.url)
    other.locator("#cells > .cell .view").first.click()
    other.keyboard.press("Control+a")
    other.keyboard.type("a = 2  # from the other tab")
    other.keyboard.press("Escape")
    expect(other.locator("#cells > .cell .view").first).to_contain_text("other tab")

    # this tab still shows version 1 of the cell: its save is refused, its text kept
    cells(page).nth(0).locator(".view").click()
    page.keyboard.press("Control+a")
    page.keyboard.type("a = 3  # mine")
    page.keyboard.press("Escape")
    conflict = cells(page).nth(0).locator(".conflict")
    expect(conflict).to_contain_text("changed elsewhere")
    assert stored(server, did).messages[0].source == "a = 2  # from the other tab"
    expect(cells(page).nth(0).locator(".CodeMirror")).to_contain_text("a = 3  # mine")
    conflict.locator("[data-act=keep-mine]").click()
    expect(cells(page).nth(0).locator(".conflict")).to_have_count(0)
    assert stored(server, did).messages[0].source == "a = 3  # mine"
    other.close()
    # the refused save answered 409, which Chromium logs as a failed resource; nothing else
    assert all("409" in e for e in page.watch.errors), page.watch.errors
    assert page.watch.outside(server.url) == []


def test_screenshots(page: Page, server, tmp_path: Path) -> None:
    """The main screens. Written to docs/screenshots when DIALOGUE_SCREENSHOTS names a folder
    (the README shows them), to a temporary folder otherwise."""
    out = Path(os.environ.get("DIALOGUE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    did = new_dialogue(page, server, "Analysis of squares")
    svc = DialogueService(server.db)
    try:
        svc.add(did, "note", "# Squares\nA short look at **squares** of small numbers.")
        svc.add(did, "code", "squares = [n * n for n in range(8)]\nprint(squares)\nsum(squares)")
        svc.add(did, "prompt", "What is the sum of the first eight squares?",
                response="The first eight squares (0 to 49) add up to **140**.\n\n"
                         "```python\nsum(n * n for n in range(8))\n```",
                usage={"input": 812, "output": 31, "cache_read": 640, "cache_write": 0,
                       "model": "local:default", "stop_reason": "end", "cost": 0.0})
        svc.add(did, "code", "import pandas as pd\npd.DataFrame({'n': range(4), 'square': [n*n for n in range(4)]})",
                outputs=[{"output_type": "execute_result", "execution_count": 2, "metadata": {},
                          "data": {"text/plain": "   n  square\n0  0       0\n1  1       1",
                                   "text/html": "<table><tr><th>n</th><th>square</th></tr>"
                                                "<tr><td>0</td><td>0</td></tr><tr><td>1</td><td>1</td></tr>"
                                                "<tr><td>2</td><td>4</td></tr><tr><td>3</td><td>9</td></tr></table>"}}],
                execution_count=2, exported=True, pinned=True)
        svc.add(did, "code", "1 / 0", outputs=[{"output_type": "error", "ename": "ZeroDivisionError",
                                                "evalue": "division by zero",
                                                "traceback": ["Traceback (most recent call last)",
                                                              "ZeroDivisionError: division by zero"]}],
                execution_count=3)
    finally:
        svc.close()
    page.reload()
    cells(page).nth(1).locator(".view").click()  # the code cell, in edit mode
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Enter")
    expect(cells(page).nth(1).locator(".outputs")).to_contain_text("140", timeout=60_000)
    cells(page).nth(2).hover()
    page.screenshot(path=str(out / "dialogue.png"), full_page=True)

    cells(page).nth(1).locator(".view").click()
    page.screenshot(path=str(out / "editing.png"))
    page.keyboard.press("Escape")
    cells(page).nth(1).hover()
    cells(page).nth(1).locator("details.cell-menu summary").click()
    cells(page).nth(1).locator("[data-act=history]").click()
    expect(page.locator("#history")).to_be_visible()
    page.screenshot(path=str(out / "history.png"))
    page.keyboard.press("Escape")
    page.keyboard.press("?")
    page.screenshot(path=str(out / "keyboard.png"))
    page.keyboard.press("Escape")

    page.goto(server.url + "/")
    page.fill("#search", "squares")
    expect(page.locator("#search-results mark").first).to_be_visible()
    page.screenshot(path=str(out / "dialogues.png"))
    for name in ("dialogue", "editing", "history", "keyboard", "dialogues"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    check_clean(page, server)
