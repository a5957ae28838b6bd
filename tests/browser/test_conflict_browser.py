"""What the user typed is never lost: an answer edited in a stale tab, in a real browser.

Two tabs show the same prompt. One edits the model's answer and saves; the other, still showing
the old version, edits the answer too and saves. Its save is refused, and the conflict box holds
the answer it typed (once it held the prompt's source and the typed answer was gone); "Save mine
over it" stores it without touching the prompt.
"""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

from dialogue.service import DialogueService

pytestmark = pytest.mark.browser


def _edit_answer(page: Page, text: str) -> None:
    cell = page.locator("#cells > .cell").first
    cell.hover()
    cell.locator("[data-act=edit-answer]").click()
    expect(cell.locator(".answer-edit .CodeMirror")).to_be_visible()
    page.keyboard.press("Control+a")
    page.keyboard.type(text)


def test_an_answer_edited_in_a_stale_tab_is_kept(page: Page, server) -> None:
    svc = DialogueService(server.db)
    try:
        d = svc.create("stale answer")
        m = svc.add(d.id, "prompt", "Say hello.", response="Hello.")
    finally:
        svc.close()
    page.goto(f"{server.url}/d/{d.id}")
    other = page.context.new_page()
    other.goto(f"{server.url}/d/{d.id}")

    _edit_answer(other, "Hello from the other tab.")
    other.locator("#cells > .cell [data-act=save-answer]").click()
    expect(other.locator("#cells > .cell .answer.markdown")).to_have_text("Hello from the other tab.")
    other.close()

    _edit_answer(page, "My **own** answer.")
    cell = page.locator("#cells > .cell").first
    cell.locator(".answer-edit [data-act=save-answer]").click()
    conflict = cell.locator(".conflict")
    expect(conflict).to_contain_text("changed elsewhere")
    # the typed answer is in an editor in the conflict box; the prompt's editor is not opened
    expect(conflict.locator(".CodeMirror")).to_contain_text("My **own** answer.")
    expect(cell).not_to_have_class(re.compile(r"\bediting\b"))
    s = stored(server, d.id).messages[0]
    assert (s.response, s.source) == ("Hello from the other tab.", "Say hello.")

    # more typing in the kept editor, then Ctrl+S: "save mine over it"
    conflict.locator(".CodeMirror").click()
    page.keyboard.press("End")
    page.keyboard.type(" Edited again.")
    page.keyboard.press("Control+s")
    expect(cell.locator(".conflict")).to_have_count(0)
    expect(cell.locator(".answer.markdown strong")).to_have_text("own")
    s = stored(server, d.id).messages[0]
    assert (s.response, s.source) == ("My **own** answer. Edited again.", "Say hello.")
    assert s.id == m.id
    # the refused save answered 409, which Chromium logs as a failed resource; nothing else
    assert all("409" in e for e in page.watch.errors), page.watch.errors
    assert page.watch.outside(server.url) == []
