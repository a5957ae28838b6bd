"""A crash of the local model, as a user of the web app sees it, in a real Chromium against a real
server process: the model process dies natively (SIGSEGV, planned by the worker's test hook)
halfway through an answer. The cell says what happened, the server stays up, and the next prompt
is answered by a fresh model process."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browserutil import free_port, start_server, stop
from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_crashed_model_process_is_an_error_on_one_answer(browser, tmp_path: Path, monkeypatch) -> None:
    db, port, plan = tmp_path / "dialogue.db", free_port(), tmp_path / "crash"
    monkeypatch.setenv("DIALOGUE_TEST_HOOKS", "1")
    monkeypatch.setenv("DIALOGUE_TEST_CRASH_FILE", str(plan))
    svc = DialogueService(db)
    d = svc.create("Crash", model="local:default")
    code = svc.add(d.id, "code", "x = 41")
    first = svc.add(d.id, "prompt", "Tell me a story about the sea.")
    second = svc.add(d.id, "prompt", "What is 2+2?")
    svc.close()
    plan.write_text("3 segv")  # the next answer's model process dies after 3 pieces

    proc = start_server(tmp_path, db, port)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page: Page = ctx.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{port}/d/{d.id}")
        c = page.locator(f"#m-{code.id}")
        c.click()
        page.keyboard.press("Control+Enter")
        expect(c.locator(".kind-tag")).to_have_text(re.compile(r"\[1\]"))

        cell = page.locator(f"#m-{first.id}")
        cell.click()
        page.keyboard.press("Control+Enter")
        expect(cell).to_contain_text("the local model process crashed (SIGSEGV, signal 11)", timeout=120_000)
        expect(cell).to_contain_text("restarts on the next prompt")
        expect(cell.locator(".result.running")).to_have_count(0)
        assert not plan.exists()
        assert proc.poll() is None, "the server died with its model"
        expect(page.locator("#conn")).to_have_count(0)  # the page never lost the server

        # the kernel is the same one (x survived), and the next prompt is answered
        c.click()
        page.keyboard.press("Enter")
        page.keyboard.press("Control+a")
        page.keyboard.type("x + 1")
        page.keyboard.press("Control+Enter")
        expect(c.locator(".outputs")).to_have_text("42")
        page.keyboard.press("Escape")
        nxt = page.locator(f"#m-{second.id}")
        nxt.click()
        page.keyboard.press("Control+Enter")
        expect(nxt.locator(".result.running")).to_have_count(1)
        expect(nxt.locator(".result.running")).to_have_count(0, timeout=120_000)
        check = DialogueService(db)
        try:
            ms = {m.id: m for m in check.open(d.id).messages}
        finally:
            check.close()
        assert "crashed" in ms[first.id].meta.get("error", "")
        assert ms[second.id].response.strip() and not ms[second.id].meta.get("error")
        assert errors == [], errors
    finally:
        ctx.close()
        stop(proc)
