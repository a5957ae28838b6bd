"""The page never waits blind, in a real headless Chromium against a real server process.

- The server is gone: killed with SIGKILL under a running cell, then started again on the same
  port and database. The page must say it is disconnected (not spin forever), and once the server
  is back, drop that state and show the cell as the store kept it.
- A model reads a long prompt: the cell shows how far it is, then the answer replaces it. The
  model is a stand-in registered in the server process (tests/reading_provider.py).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browserutil import alive as _alive
from browserutil import free_port as _free_port
from browserutil import start_server, stop
from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_killed_server_shows_disconnected_then_recovers(browser, tmp_path: Path) -> None:
    db, port = tmp_path / "dialogue.db", _free_port()
    url = f"http://127.0.0.1:{port}"
    svc = DialogueService(db)
    d = svc.create("Disconnect")
    m = svc.add(d.id, "code", "import os, time\nprint('kernel', os.getpid(), flush=True)\n"
                              "time.sleep(30)\nprint('never')")
    svc.close()

    proc = start_server(tmp_path, db, port)
    again = None
    kernel_pid = None
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page: Page = ctx.new_page()
    page.set_default_timeout(20_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(f"{url}/d/{d.id}")
        banner = page.locator("#conn")
        expect(banner).to_have_count(0)  # nothing to say while all is well
        cell = page.locator(f"#m-{m.id}")
        cell.click()
        page.keyboard.press("Control+Enter")
        out = cell.locator(".outputs")
        expect(out).to_contain_text("kernel ", timeout=60_000)  # the cell is running
        kernel_pid = int(re.search(r"kernel (\d+)", out.inner_text()).group(1))
        expect(cell.locator(".result.running .spinner")).to_be_visible()

        # The cell's event stream may reconnect by itself once the server is back; keep it from
        # doing so, so that what brings the cell back is the page's own recovery.
        page.route(re.compile(r".*/stream$"), lambda route: route.abort())
        proc.kill()  # SIGKILL: no shutdown, no last words on the stream
        proc.wait(10)
        expect(banner).to_be_visible(timeout=15_000)
        expect(banner).to_contain_text("Disconnected from the server: reconnecting")
        expect(page.locator("body")).to_have_class(re.compile(r"\boffline\b"))
        # the running cell stops spinning and says why
        expect(cell.locator(".spinner")).to_have_css("animation-play-state", "paused")
        assert "connection lost" in cell.locator(".run-status").evaluate(
            "el => getComputedStyle(el, '::after').content")
        # it stays down a while: the page keeps saying so (and keeps trying); meanwhile the
        # user starts editing the cell
        cell.click()
        page.keyboard.press("Enter")
        page.keyboard.press("Control+a")
        page.keyboard.type("6 * 7")
        page.wait_for_timeout(3000)
        expect(banner).to_be_visible()

        requests.clear()
        again = start_server(tmp_path, db, port)
        expect(banner).to_be_hidden(timeout=30_000)
        assert f"{url}/health" in requests
        expect(page.locator("body")).not_to_have_class(re.compile(r"\boffline\b"))
        # the cell is re-rendered from the store: the run ended with the old server
        expect(cell.locator(".result.running")).to_have_count(0, timeout=15_000)
        expect(cell.locator(".result")).to_contain_text("was cut off")
        expect(cell.locator(".outputs")).to_contain_text(f"kernel {kernel_pid}")
        # (it asked for the cell's state itself)
        assert any(u.split("?")[0] == f"{url}/d/{d.id}/m/{m.id}" for u in requests), requests
        page.unroute(re.compile(r".*/stream$"))
        check = DialogueService(db)
        kept = check.open(d.id).messages[0]
        check.close()
        assert kept.meta.get("interrupted") and "never" not in str(kept.outputs)

        # the edit in progress was kept, and the page works again: run it on the new server
        # (its version was refreshed with the result, so it is not refused as stale)
        expect(cell).to_have_class(re.compile(r"\bediting\b"))
        expect(cell.locator(".CodeMirror")).to_contain_text("6 * 7")
        expect(cell.locator(".kind-tag")).not_to_have_text("[*]")
        page.keyboard.press("Control+Enter")
        expect(cell.locator(".outputs")).to_have_text("42", timeout=60_000)
        expect(banner).to_be_hidden()
        check = DialogueService(db)
        assert check.open(d.id).messages[0].source == "6 * 7"
        check.close()
        assert page_errors == [], page_errors
    finally:
        ctx.close()
        proc.kill()
        if again is not None:
            stop(again)
        # the old server's kernel watches its parent and exits with it; make sure it did
        if kernel_pid is not None:
            deadline = time.monotonic() + 20
            while _alive(kernel_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(kernel_pid):
                os.kill(kernel_pid, signal.SIGKILL)
                pytest.fail(f"the killed server's kernel {kernel_pid} outlived it")


def test_a_long_prompt_shows_reading_progress_then_the_answer(browser, tmp_path: Path) -> None:
    db, port, gate = tmp_path / "dialogue.db", _free_port(), tmp_path / "go"
    import reading_provider
    reading_provider.install()  # here too: the service checks a model's name when it is set
    svc = DialogueService(db)
    d = svc.create("Reading", model=f"test-reading:total=1280,chunk=256,delay=1.0,rate=25,"
                                    f"gate={gate}")
    m = svc.add(d.id, "prompt", "What is 2+2?")
    svc.close()
    proc = start_server(tmp_path, db, port,
                        prelude="import reading_provider; reading_provider.install()")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page: Page = ctx.new_page()
    page.set_default_timeout(20_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{port}/d/{d.id}")
        cell = page.locator(f"#m-{m.id}")
        cell.click()
        page.keyboard.press("Control+Enter")
        reading = cell.locator(f"#p-{m.id}")
        # it moves while the page watches: an early report with its estimate, then the last one
        expect(reading).to_contain_text(re.compile(r"reading the prompt: (512|768|1,024) / 1,280 "
                                                   r"tokens · about \d+ s left"))
        expect(reading).to_contain_text("reading the prompt: 1,280 / 1,280 tokens")
        expect(reading.locator("progress")).to_have_attribute("value", "1280")
        expect(cell.locator(".answer")).to_have_text("")
        gate.touch()
        expect(cell.locator(".answer")).to_have_text("The answer is 4.")
        expect(cell.locator(".result.running")).to_have_count(0)
        expect(cell.locator(".read-progress:visible")).to_have_count(0)
        assert "reading the prompt" not in cell.inner_text()
        assert page_errors == [], page_errors
    finally:
        ctx.close()
        stop(proc)
