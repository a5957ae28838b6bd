"""Kernels in a real browser: the header's kernel picker (an installed kernelspec, a Python
interpreter by path), input() answered from the cell's output, and a restart that asks first and
says "restarting…" until the new kernel is ready. A real server with a kernelspec in its own
JUPYTER_PATH, real venvs, headless Chromium."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import Page, expect

from browserutil import free_port, start_server, stored
from kernelenvs import make_venv, write_kernelspec

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    return (make_venv(root / "good", with_ipykernel=True),
            make_venv(root / "bare", with_ipykernel=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory, envs):
    """A server whose Jupyter finds one more kernel, 'otherpy' (the good venv's Python)."""
    tmp = tmp_path_factory.mktemp("kweb")
    write_kernelspec(tmp / "jupyter", "otherpy", envs[0], "Other Python")
    port = free_port()
    db, log = tmp / "dialogue.db", tmp / "server.log"
    proc = start_server(tmp, db, port, log=log,
                        prelude=f"import os; os.environ['JUPYTER_PATH'] = {str(tmp / 'jupyter')!r}")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", db=db, proc=proc, log=log)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def new_dialogue(page: Page, server, name: str) -> str:
    page.goto(server.url + "/")
    page.fill("#new-form input[name=name]", name)
    page.press("#new-form input[name=name]", "Enter")
    page.wait_for_url(re.compile(r"/d/[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[1]


def run_code(page: Page, code: str, index: int):
    """Add a code cell at the end, type `code`, run it; the cell."""
    page.keyboard.press("Escape")
    page.locator("[data-act=append-code]").click()
    cell = page.locator("#cells > .cell").nth(index)
    expect(cell).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type(code)
    page.keyboard.press("Control+Enter")
    return cell


def check_clean(page: Page, server) -> None:
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def test_input_is_answered_from_the_page(page: Page, server) -> None:
    did = new_dialogue(page, server, "asks")
    c = run_code(page, "name = input('Name? ')\nimport getpass\npw = getpass.getpass('Password: ')\n"
                       "print('hello', name, len(pw))", 0)
    box = c.locator("form.stdin")
    expect(box).to_be_visible(timeout=60_000)
    expect(box.locator(".stdin-prompt")).to_have_text("Name? ")
    expect(box.locator("input.stdin-value")).to_be_focused()
    page.keyboard.type("Ada")
    page.keyboard.press("Enter")
    # the password question replaces it, in a password field
    expect(box.locator(".stdin-prompt")).to_have_text("Password: ")
    pw = box.locator("input[type=password]")
    expect(pw).to_be_visible()
    pw.fill("hunter2")
    box.locator("button[type=submit]").click()
    expect(c.locator(".result.running")).to_have_count(0, timeout=30_000)
    expect(c.locator(".outputs")).to_have_text(re.compile(r"Name\? Ada\s+Password: \s+hello Ada 7"))
    expect(c.locator("form.stdin")).to_have_count(0)
    m = stored(server, did).messages[0]
    assert m.outputs[0]["text"] == "Name? Ada\nPassword: \nhello Ada 7\n"
    assert "hunter2" not in json.dumps(m.outputs)
    # a page opened while a cell waits shows the question too (from the run's live state)
    c2 = run_code(page, "print(input('Again? ') * 2)", 1)
    expect(c2.locator("form.stdin")).to_be_visible(timeout=60_000)
    page.reload()
    c2 = page.locator("#cells > .cell").nth(1)
    box = c2.locator("form.stdin")
    expect(box.locator(".stdin-prompt")).to_have_text("Again? ")
    box.locator("input.stdin-value").fill("ab")
    box.locator("input.stdin-value").press("Enter")
    expect(c2.locator(".outputs")).to_have_text(re.compile(r"Again\? ab\s+abab"), timeout=30_000)
    check_clean(page, server)


def test_restart_asks_first_and_says_restarting(page: Page, server) -> None:
    new_dialogue(page, server, "restarts")
    c = run_code(page, "x = 41\nprint('set')", 0)
    expect(c.locator(".outputs")).to_have_text("set", timeout=60_000)
    badge = page.locator("#kernel .kstatus")
    expect(badge).to_have_text("kernel idle")
    # the question first; Cancel keeps the kernel and its variables
    page.locator("#kernel [data-act=restart-kernel]").click()
    dialog = page.locator("#restart-confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("every variable of this dialogue is lost")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    c2 = run_code(page, "print(x + 1)", 1)
    expect(c2.locator(".outputs")).to_have_text("42", timeout=60_000)
    # confirmed: "restarting…" until the new kernel is ready, then idle, with x gone
    page.locator("#kernel [data-act=restart-kernel]").click()
    page.locator("#restart-confirm [data-act=confirm-restart]").click()
    expect(page.locator("#restart-confirm")).to_have_count(0)
    expect(badge).to_have_text("restarting…")
    expect(page.locator("#kernel [data-act=restart-kernel]")).to_be_disabled()
    expect(badge).to_have_text("kernel idle", timeout=60_000)
    c3 = run_code(page, "print('x' in dir())", 2)
    expect(c3.locator(".outputs")).to_have_text("False", timeout=60_000)
    check_clean(page, server)


def test_the_header_chooses_the_kernel(page: Page, server, envs) -> None:
    good, bare = envs
    did = new_dialogue(page, server, "kernels")
    pick = page.locator("#kernel-pick")
    expect(pick.locator("option:checked")).to_have_text("Python 3 (dialogue)")
    pick.select_option(label="Other Python")
    expect(page.locator("#toast")).to_contain_text("Kernel: Other Python")
    assert stored(server, did).meta["kernel"] == {"spec": "otherpy"}
    c = run_code(page, "import sys; print(sys.executable)", 0)
    expect(c.locator(".outputs")).to_have_text(good, timeout=60_000)
    # the export says which kernel: Jupyter opens it without asking
    nb = page.request.get(f"{server.url}/d/{did}/export/ipynb").json()
    assert nb["metadata"]["kernelspec"] == {"name": "otherpy", "display_name": "Other Python",
                                            "language": "python"}
    assert nb["metadata"]["language_info"]["name"] == "python"
    assert nb["metadata"]["language_info"]["version"]  # from the kernel's own kernel_info reply

    # a Python interpreter by path: one without ipykernel is refused, saying how to fix it
    pick.select_option(label="Python interpreter…")
    dialog = page.locator("#python-kernel")
    expect(dialog).to_be_visible()
    dialog.locator("input[name=python]").fill(bare)
    dialog.locator("[data-act=use-python]").click()
    expect(page.locator("#toast")).to_contain_text(f"{bare} -m pip install ipykernel")
    assert stored(server, did).meta["kernel"] == {"spec": "otherpy"}  # unchanged
    dialog.locator("input[name=python]").fill(good)
    dialog.locator("[data-act=use-python]").click()
    expect(dialog).to_have_count(0)
    expect(pick.locator("option:checked")).to_have_text(f"Python: {good}")
    assert stored(server, did).meta["kernel"] == {"python": good}
    c2 = run_code(page, "import sys; print(sys.prefix)", 1)
    expect(c2.locator(".outputs")).to_have_text(str(Path(good).parents[1]),
                                                timeout=60_000)
    # back to the app's own; the choice survives a reload
    pick.select_option(label="Python 3 (dialogue)")
    expect(page.locator("#toast")).to_contain_text("Kernel: Python 3 (dialogue)")
    page.reload()
    expect(page.locator("#kernel-pick option:checked")).to_have_text("Python 3 (dialogue)")
    c3 = run_code(page, "import sys; print(sys.executable)", 2)
    expect(c3.locator(".outputs")).to_have_text(sys.executable, timeout=60_000)
    # the 400 of the refused interpreter is the only console error
    assert len(page.watch.errors) == 1 and "400" in page.watch.errors[0], page.watch.errors
    assert page.watch.outside(server.url) == []
