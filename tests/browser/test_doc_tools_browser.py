"""The model editing and running its own dialogue, seen in a real browser: a dialogue server whose
Claude is the local replay server (the official SDK in the server process) scripting document
tool calls. The answer asks before each change (Allow once), and the page shows each change as it
happens, without a reload: the replacement in the code cell, the cell running and its new
output, a note the model adds after it; the history names the model as the edit's author."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from servers import anthropic_events, sse
from test_approvals_browser import run  # a cell run from its toolbar

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]

BROKEN = 'greeting = "hello"\nprnt(greeting.upper())\n'


def call(tid: str, name: str, args: dict) -> object:
    return sse(anthropic_events(tool_uses=[(tid, name, args)]))


def test_the_model_fixes_and_runs_a_cell_and_the_page_follows(page: Page, tmp_path) -> None:
    with claude_server(tmp_path, "doc.db") as (srv, url, db):
        fixes_and_runs(page, srv, url, db)


def agent_dialogue(db, prompt: str, *, always: list[str] = ()) -> tuple:
    """A Claude dialogue with the broken cell and `prompt`, document tools on: (d, code, prompt)."""
    svc = DialogueService(db)
    try:
        d = svc.create("agent", model="claude-sonnet-4-5")
        code = svc.add(d.id, "code", BROKEN)
        p = svc.add(d.id, "prompt", prompt)
        svc.set_doc_tools(d.id, "all")
        if always:
            svc.set_approvals(d.id, always=list(always))
        return d, code, p
    finally:
        svc.close()


def fixes_and_runs(page: Page, srv, url: str, db) -> None:
    d, code, prompt = agent_dialogue(db, "Fix the failing cell and run it.")

    page.goto(f"{url}/d/{d.id}")
    c = page.locator(f"#m-{code.id}")
    run(c)
    expect(c.locator(".kind-tag")).to_have_text("[1]", timeout=60_000)
    expect(c.locator(".outputs")).to_contain_text("NameError")

    srv.push(call("toolu_1", "replace_text", {"id": code.id, "old": "prnt(", "new": "print("}),
             call("toolu_2", "run_code", {"id": code.id}),
             call("toolu_3", "add_message", {"after": code.id, "kind": "note",
                                             "source": "Fixed the typo: `prnt` was `print`."}),
             sse(anthropic_events(["Fixed: it prints HELLO."])))
    a = page.locator(f"#m-{prompt.id}")
    run(a)
    box = a.locator(".approval")
    expect(box).to_have_count(1, timeout=30_000)
    expect(box).to_contain_text("replace_text")
    expect(box).to_contain_text("+print(greeting.upper())")  # the diff it would make
    box.locator("[data-act=approve-once]").click()
    # the page shows the edit at once, in the cell itself
    expect(c.locator(".view")).to_contain_text("print(greeting.upper())", timeout=30_000)
    expect(c.locator(".view")).not_to_contain_text("prnt(")
    box = a.locator(".approval")
    expect(box).to_contain_text("run_code", timeout=30_000)
    box.locator("[data-act=approve-once]").click()
    expect(c.locator(".outputs")).to_contain_text("HELLO", timeout=60_000)
    expect(c.locator(".kind-tag")).to_have_text("[2]", timeout=30_000)
    box = a.locator(".approval")
    expect(box).to_contain_text("add_message", timeout=30_000)
    box.locator("[data-act=approve-once]").click()
    expect(a.locator(".answer.markdown")).to_contain_text("Fixed: it prints HELLO.",
                                                          timeout=30_000)
    cells = page.locator("#cells > .cell")
    expect(cells).to_have_count(3)
    expect(cells.nth(1)).to_contain_text("Fixed the typo")  # after the code, before the prompt
    expect(cells.nth(2)).to_have_attribute("id", f"m-{prompt.id}")

    # the history names the model and its answer
    c.locator(".view").hover()
    c.locator("details.cell-menu summary, .cell-menu summary").first.click()
    c.locator("[data-act=history]").click()
    modal = page.locator("dialog#history")
    expect(modal).to_be_visible()
    expect(modal).to_contain_text(f"edited by model, in answer {prompt.id}")


SCRIPT = '''from dialogue.here import read, replace, add
replace(read(1).id, "prnt(", "print(")
add("A note from the script.", kind="note")
'''


def test_a_cell_scripting_its_dialogue_shows_its_changes(page: Page, tmp_path) -> None:
    """dialogue.here writes from the kernel's process; the page learns of it when the cell's run
    ends (the run reports the messages its cell changed) and swaps them in, without a reload."""
    with claude_server(tmp_path, "here.db") as (srv, url, db):
        svc = DialogueService(db)
        try:
            d = svc.create("script")
            code = svc.add(d.id, "code", BROKEN)
            script = svc.add(d.id, "code", SCRIPT)
        finally:
            svc.close()
        page.goto(f"{url}/d/{d.id}")
        s = page.locator(f"#m-{script.id}")
        run(s)
        expect(s.locator(".kind-tag")).to_have_text("[1]", timeout=60_000)
        c = page.locator(f"#m-{code.id}")
        expect(c.locator(".view")).to_contain_text("print(greeting.upper())", timeout=10_000)
        cells = page.locator("#cells > .cell")
        expect(cells).to_have_count(3)
        expect(cells.nth(2)).to_contain_text("A note from the script.")  # after the script


def test_a_cell_being_edited_is_kept_and_its_save_meets_the_change(page: Page, tmp_path) -> None:
    """The model changes a cell the user is typing in: the page keeps the editor and the typing
    (and says why), and the save meets the model's version as a conflict showing both."""
    with claude_server(tmp_path, "editing.db") as (srv, url, db):
        d, code, prompt = agent_dialogue(db, "Fix the failing cell.", always=["replace_text"])
        # the call comes slowly, so the user is typing when it lands
        srv.push(sse(anthropic_events(tool_uses=[("toolu_1", "replace_text", {
                     "id": code.id, "old": "prnt(", "new": "print("})]), delay=0.4),
                 sse(anthropic_events(["Fixed."])))
        page.goto(f"{url}/d/{d.id}")
        a = page.locator(f"#m-{prompt.id}")
        run(a)
        c = page.locator(f"#m-{code.id}")
        c.locator(".view").click()
        expect(c).to_have_class(re.compile(r"\bediting\b"))
        page.keyboard.press("Control+a")
        page.keyboard.type("print('mine')")
        expect(a.locator(".answer.markdown")).to_contain_text("Fixed.", timeout=30_000)
        expect(page.locator("#toast")).to_contain_text("changed elsewhere")
        expect(c).to_have_class(re.compile(r"\bediting\b"))  # not swapped under the typing
        expect(c.locator(".CodeMirror")).to_contain_text("print('mine')")
        page.keyboard.press("Escape")  # save: refused, both shown
        expect(c.locator(".conflict")).to_contain_text("changed elsewhere", timeout=10_000)
        expect(c.locator(".CodeMirror")).to_contain_text("print('mine')")
        svc = DialogueService(db)
        try:
            assert svc.message(d.id, code.id).source == BROKEN.replace("prnt(", "print(")
        finally:
            svc.close()
